"""What every model config shares: it goes to JSON next to each checkpoint and comes back from it."""

from __future__ import annotations

import json
from dataclasses import asdict, fields


class JsonConfig:
    """Mixin of the frozen model-config dataclasses: ``to_json`` and ``from_dict`` (refusing unknown keys).

    Subclasses name themselves in errors (``config_name``) and list the fields JSON turns into
    lists that the dataclass holds as tuples (``tuple_fields``).
    """

    config_name = "model"
    tuple_fields: tuple[str, ...] = ()

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
