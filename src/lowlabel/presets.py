"""Named parameter presets: ``presets/<name>.yaml`` holds overrides of the defaults.

    python -m lowlabel.presets NAME [--out params.yaml]

writes the defaults merged with the preset, validated, as the params file DVC tracks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from lowlabel.config import ConfigError, Params, parse_params

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(base.get(key) or {}, value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def set_param(raw: dict[str, Any], dotted_key: str, value: str) -> None:
    """``raw[a][b] = yaml(value)`` for ``dotted_key`` 'a.b' (a command line's ``--set a.b=value``)."""
    *parents, leaf = dotted_key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def build(name: str, presets_dir: Path = PRESETS_DIR) -> Params:
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset {name!r}; available: {', '.join(available()) or 'none'}")
    overrides = yaml.safe_load(path.read_text()) or {}
    return parse_params(merge(Params().model_dump(mode="json"), overrides), source=str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write params.yaml from a named preset")
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(available())}")
    parser.add_argument("--out", default="params.yaml")
    args = parser.parse_args(argv)
    if not args.name:
        print("\n".join(available()))
        return 0
    try:
        params = build(args.name)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    header = f"# Written by `./pipeline preset {args.name}` from presets/{args.name}.yaml over the defaults.\n"
    Path(args.out).write_text(header + yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    print(f"wrote {args.out} from preset {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
