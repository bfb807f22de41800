"""What a checked config file is: its pipelines' specs (`PipelineSpec`), each with its
`Supervision`, in a `ServeConfig`. Made by `changefeed.serve.pipelines.config.load_config`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from changefeed.serve.pipelines.toml_lines import Path


@dataclass(frozen=True)
class Supervision:
    """How a pipeline is supervised (the ``restart_*`` and ``stop_timeout`` keys)."""

    restart_delay: float = 1.0
    """Seconds before the first restart after a failure; doubling per failure in a row."""
    restart_max_delay: float = 60.0
    """The longest wait between restarts."""
    stop_timeout: float = 30.0
    """Seconds a stopping pipeline gets to deliver and acknowledge before it is killed."""


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline of the file, checked: what its process needs to run it (`to_json`)."""

    name: str
    options: dict[str, Any]
    """`changefeed.cli.run.RunOptions` fields, JSON values (``ops`` as a list of names)."""
    source: dict[str, Any]
    """``{"kind": "database"}``, or the read-back source: kind, topics/stream, group, ..."""
    enabled: bool = True
    supervision: Supervision = field(default_factory=Supervision)
    secrets: tuple[str, ...] = ()
    """Values the file took from the environment: masked in every output of its process."""
    origins: dict[str, Path] = field(default_factory=dict, compare=False, repr=False)
    """Where each key's value was set (in its table or in ``[defaults]``), for messages."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "source": self.source,
                "secrets": list(self.secrets)}

    @property
    def fingerprint(self) -> str:
        """Equal for two specs that run the same way (a reload restarts a pipeline whose
        fingerprint changed)."""
        return json.dumps([self.to_json(), self.enabled, self.supervision.__dict__],
                          sort_keys=True, default=str)


@dataclass
class ServeConfig:
    """A config file, checked: its pipelines by name, in file order."""

    path: str
    pipelines: dict[str, PipelineSpec]
    locate: Callable[[Path], str] = field(repr=False, default=lambda path: "")
    """``path`` -> ``file:line: key`` for messages about a key found later (`check_tables`)."""


__all__ = ["PipelineSpec", "ServeConfig", "Supervision"]
