"""A pipeline spec made into running parts, as ``changefeed run`` makes them: its `RunOptions`
(`run_options`), the feed and the pipeline's parts (`build`), connecting nowhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from changefeed.change import Operation
from changefeed.errors import ConfigurationError
from changefeed.redact import redact
from changefeed.serve.pipelines.specs import PipelineSpec


@dataclass
class Built:
    """What a spec makes: the feed (not connected) and the parts of its pipeline."""

    feed: Any
    parts: Any
    """`changefeed.cli.pipeline_options.PipelineParts`."""
    options: Any
    """`changefeed.cli.run.RunOptions`."""


def run_options(spec: PipelineSpec) -> Any:
    """The spec's options as `changefeed.cli.run.RunOptions`."""
    from changefeed.cli.pipeline_options import workers_count
    from changefeed.cli.run import RunOptions

    values = dict(spec.options)
    values["workers"] = workers_count(values.get("workers", 1))  # "auto": this machine's cores
    values["ops"] = Operation.parse(",".join(values["ops"]))
    for key in ("tables", "exclude", "stages", "messages"):
        values[key] = tuple(values[key])
    return RunOptions(**values)


def build(spec: PipelineSpec) -> Built:
    """The feed and pipeline parts of ``spec``, made as ``changefeed run`` makes them: checks
    every option (raising `changefeed.cli.pipeline_options.OptionError`), connects nowhere."""
    from changefeed.cli.pipeline_options import blame, pipeline_parts
    from changefeed.cli.run import check_options, make_feed

    options = run_options(spec)

    def flag(option: str) -> str:
        return {"fmt": "format", "tables": "tables"}.get(option, option)

    if spec.source["kind"] == "database":
        feed_options = check_options(options, flag=flag, pipeline=True)
        feed = make_feed(options, {**feed_options, "name": spec.name})
    else:
        with blame("url"):
            feed = _read_back_feed(spec, options)
    parts = pipeline_parts(
        feed, where=options.where, filter=options.filter, stages=options.stages,
        sink=options.sink, dead_letter=options.dead_letter, fmt=options.fmt,
        model=options.model, flag=flag,
    )
    return Built(feed, parts, options)


def _read_back_feed(spec: PipelineSpec, options: Any) -> Any:
    """A `KafkaFeed` or `RedisStreamFeed` for a ``kafka://`` or ``redis://`` source URL."""
    from urllib.parse import parse_qs, urlsplit

    source = spec.source
    url = options.url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises for a port that is not a number)
    except ValueError as exc:
        raise ConfigurationError(f"bad URL: {exc}") from exc
    if not parts.hostname:
        raise ConfigurationError(f"a {source['kind']} source needs a host: {redact(url)!r}")
    try:
        if source["kind"] == "kafka":
            from changefeed.backends.kafka import KafkaFeed

            config: dict[str, Any] = {name: values[-1]
                                      for name, values in parse_qs(parts.query).items()}
            secure = parts.scheme.lower() == "kafkas"
            mechanism = config.pop("mechanism", "PLAIN")
            if parts.username:
                config.update({
                    "security.protocol": "SASL_SSL" if secure else "SASL_PLAINTEXT",
                    "sasl.mechanism": mechanism, "sasl.username": parts.username,
                    "sasl.password": parts.password or "",
                })
            elif secure:
                config["security.protocol"] = "SSL"
            return KafkaFeed(parts.netloc.rpartition("@")[2], source["topics"], source["group"],
                             options.ops, config=config)
        from changefeed.backends.redis_streams import RedisStreamFeed

        return RedisStreamFeed(url, source["stream"], source["group"], source["consumer"],
                               options.ops)
    except ImportError as exc:
        extra = source["kind"]
        raise ConfigurationError(f"a {extra} source needs its driver: pip install"
                                 f" 'changefeed[{extra}]' ({exc})") from exc


__all__ = ["Built", "build", "run_options"]
