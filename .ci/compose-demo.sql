-- Tables for the `changefeed` service of docker-compose.yml (.ci/changefeed.toml streams them);
-- the postgres service runs this once, when its data directory is created.
CREATE TABLE orders (id serial PRIMARY KEY, customer text NOT NULL, total numeric(10, 2),
                     created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE order_lines (id serial PRIMARY KEY, order_id int REFERENCES orders, sku text,
                          quantity int);
INSERT INTO orders (customer, total) VALUES ('ada', 12.50), ('grace', 99.00);
