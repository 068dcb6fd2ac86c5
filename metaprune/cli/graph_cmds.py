"""``convert``: model file <-> graph file."""

from __future__ import annotations

import time
from pathlib import Path

from metaprune.cli.common import add_common, guard, model_output_file, model_path, print_json, status


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a model to its channel graph, or a graph back to a model",
        description="MODEL -> graph: one node per channel, one edge per (input, output) channel pair, edge "
        "features grouped by kernel size; prints nodes, edges per group, feature sizes and the time taken. "
        "With --to-model, GRAPH -> model.safetensors (the exact inverse).")
    p.add_argument("model", nargs="?", help="model file (.safetensors, .pt state dict) or, with --to-model, a graph "
                   "file (default: the shipped checkpoint)")
    p.add_argument("-o", "--output", help="where to write the graph (.safetensors) or, with --to-model, the model")
    p.add_argument("--to-model", action="store_true", help="convert a graph file back to a model file")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt holding a whole module")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_common(p)
    p.set_defaults(func=cmd_convert)


def _print_summary(info: dict, as_json: bool) -> None:
    if as_json:
        print_json(info)
        return
    print(f"arch        {info['arch']}")
    print(f"nodes       {info['nodes']:,} x {info['node_features']} features")
    print(f"edges       {info['edges']:,}")
    for k, g in info["edge_groups"].items():
        print(f"  {k:<9} {g['edges']:>12,} x {g['features']}")
    for k in ("to_graph_s", "from_graph_s", "load_s", "save_s"):
        if k in info:
            print(f"{k:<13} {info[k]:.3f}")
    if info.get("output"):
        print(f"wrote       {info['output']}")


def cmd_convert(args) -> int:
    from metaprune.errors import ConfigError
    from metaprune.graph import Graph, from_graph, is_graph_file, to_graph
    from metaprune.io import check_output, load_model, save_model

    src = model_path(args)
    if args.output:
        guard(args, [src], files=[model_output_file(args.output) if args.to_model else args.output])
    if args.to_model:
        if not args.output:
            raise ConfigError("--to-model needs -o/--output, the model file to write (e.g. -o model.safetensors)")
        if not is_graph_file(src):
            if Path(src).suffix == ".safetensors" and Path(src).is_file():
                Graph.load(src)  # raises the precise reason: truncated, corrupt, or a model file
            raise ConfigError(f"{src} is not a metaprune graph file; write one with `metaprune convert MODEL -o G`")
        t = time.perf_counter()
        g = Graph.load(src)
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        model = from_graph(g)
        t_conv = time.perf_counter() - t
        out = save_model(model, args.output, extra={"source_graph": str(src)}, inputs=(src,))
        info = {**g.describe(), "load_s": t_load, "from_graph_s": t_conv, "output": str(out)}
        _print_summary(info, args.json)
        return 0
    if is_graph_file(src):
        raise ConfigError(f"{src} is a graph file; add --to-model -o model.safetensors to convert it back")
    if args.output:
        check_output(args.output, (src,))
    status(args, f"loading {src}")
    model, _ = load_model(src, trust_pickle=args.trust_pickle)
    t = time.perf_counter()
    g = to_graph(model)
    info = {**g.describe(), "to_graph_s": time.perf_counter() - t}
    if args.output:
        out = Path(args.output)
        t = time.perf_counter()
        g.save(out, inputs=(src,))
        info.update(save_s=time.perf_counter() - t, output=str(out))
    _print_summary(info, args.json)
    return 0
