"""What every model config shares: it goes to JSON next to each checkpoint and comes back from it."""

from __future__ import annotations

import json
from dataclasses import asdict, fields


class JsonConfig:
    """Mixin of the frozen model-config dataclasses: ``to_json``, ``from_dict`` (refusing unknown keys) and
    ``check_clip_plan`` (the fields every model has, checked the same way).

    Subclasses name themselves in errors (``config_name``) and list the fields JSON turns into
    lists that the dataclass holds as tuples (``tuple_fields``).
    """

    config_name = "model"
    tuple_fields: tuple[str, ...] = ()

    def check_clip_plan(self) -> None:
        """The clip plan every model config has: ``frame_size``, ``frames_per_clip``, ``clip_seconds``, ``stride_seconds``.

        Raises:
            ValueError: a field out of range (the message names it and its value).
        """
        if self.frame_size < 16:
            raise ValueError(f"frame_size must be >= 16, got {self.frame_size}")
        if self.frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}")
        if not self.clip_seconds > 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if not self.stride_seconds > 0:
            raise ValueError(f"stride_seconds must be > 0, got {self.stride_seconds}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict):
        """Build from a dict (e.g. config.json), refusing unknown keys.

        Raises:
            ValueError: a key the config does not have (the message lists the accepted ones), or a
                value the config's own checks refuse.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.config_name} config keys {sorted(unknown)}; accepted: {sorted(known)}")
        values = {k: tuple(v) if k in cls.tuple_fields else v for k, v in data.items()}
        return cls(**values)
