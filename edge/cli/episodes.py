"""``vla-edge convert`` and ``vla-edge view``: recorded episodes to LLaVA-VLA training data, and to Rerun.

Usage::

    vla-edge convert episodes/ --to llava-vla data/      # data.json, images/, statistics.yaml, vla_edge.json
    vla-edge view episodes/episode_0.hdf5 --save ep.rrd  # [view] extra
"""

from __future__ import annotations

from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT
from vla_edge.edge.episodes.convert import (
    DATA_JSON,
    IMAGE_DIR,
    SIDECAR_JSON,
    STATISTICS_YAML,
    ConvertConfig,
    ConvertError,
    convert,
    load_layout,
)
from vla_edge.edge.episodes.view import ViewConfig, view


def convert_main(args) -> int:
    if args.to != "llava-vla":
        raise ConvertError(f"unknown target format {args.to!r} (known: llava-vla)")
    cfg = ConvertConfig(layout=load_layout(args.layout) if args.layout else COBOT_MAGIC_LAYOUT,
                        chunk_size=args.chunk_size, jpeg_quality=args.jpeg_quality, instruction=args.instruction)
    r = convert(args.src, args.out, cfg, force=args.force,
                progress=lambda ep: print(f"  {ep.path.name}: {len(ep.qpos)} ticks", flush=True))
    print(f"wrote {r.samples} samples of {r.episodes} episodes to {r.out} "
          f"({DATA_JSON}, {IMAGE_DIR}/, {STATISTICS_YAML}, {SIDECAR_JSON})")
    return 0


def view_main(args) -> int:
    cfg = ViewConfig(layout=load_layout(args.layout) if args.layout else COBOT_MAGIC_LAYOUT)
    n = view(args.episode, args.save, cfg)
    print(f"{args.episode}: {n} ticks" + (f" -> {args.save}" if args.save else " -> Rerun viewer"))
    return 0
