"""Graph files are untrusted: every corruption is one clear GraphError (exit 2 at the CLI), before anything is built."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from graph_helpers import small_model
from safetensors.torch import load_file, safe_open, save_file

from metaprune.cli import main
from metaprune.errors import GraphError
from metaprune.graph import Graph, from_graph, graph_params, to_graph
from metaprune.graph.graph import GRAPH_META_KEY


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory) -> Path:
    return to_graph(small_model("cifar_resnet20").eval()).save(tmp_path_factory.mktemp("g") / "g.safetensors")


def _layout(head: dict, kind: str) -> dict:
    return next(e for e in head["spec"]["layout"] if e["kind"] == kind)


def _set(t: dict, key: str, fn) -> None:
    t[key] = fn(t[key].clone()).contiguous()


def _put(v: torch.Tensor, i: int, value) -> torch.Tensor:
    v.view(-1)[i] = value
    return v


def _index(value):
    def f(t):
        _set(t, "edges.k9.index", lambda v: _put(v, v.shape[1] + 7, value))  # a target node
    return f


# (name, change of the JSON head (may return a replacement), change of the tensors)
CASES = [
    ("spec without layout", lambda h: h["spec"].pop("layout"), None),
    ("spec without arch", lambda h: h["spec"].pop("arch"), None),
    ("spec is a list", lambda h: h.update(spec=[]), None),
    ("head is a list", lambda h: [], None),
    ("format_version a string", lambda h: h.update(format_version="1"), None),
    ("format_version newer", lambda h: h.update(format_version=99), None),
    ("groups a string", lambda h: h.update(groups="k9"), None),
    ("group missing its tensors", lambda h: h["groups"].append("k49"), None),
    ("layout a dict", lambda h: h["spec"].update(layout={}), None),
    ("layout count a string", lambda h: _layout(h, "node").update(count="abc"), None),
    ("layout start past the nodes", lambda h: _layout(h, "node").update(start=10**6), None),
    ("layout slot out of range", lambda h: _layout(h, "node").update(slots=[99]), None),
    ("layout shape too small", lambda h: _layout(h, "edge").update(shape=[3, 3]), None),
    ("layout shape negative", lambda h: _layout(h, "edge").update(shape=[-1, 4]), None),
    ("layout offset past the edges", lambda h: _layout(h, "edge").update(offset=10**9), None),
    ("layout group unknown", lambda h: _layout(h, "edge").update(group="k7"), None),
    ("layout view unknown", lambda h: _layout(h, "edge").update(view="evil"), None),
    ("layout kind unknown", lambda h: _layout(h, "edge").update(kind="pickle"), None),
    ("dtype name not whitelisted", lambda h: _layout(h, "node").update(dtype="load"), None),
    ("dtype name a torch class", lambda h: _layout(h, "edge").update(dtype="Tensor"), None),
    ("dtype name a list", lambda h: _layout(h, "edge").update(dtype=["float32"]), None),
    ("duplicate layout key", lambda h: h["spec"]["layout"].append(dict(h["spec"]["layout"][0])), None),
    ("const not a number", lambda h: _layout(h, "const").update(value="x"), None),
    ("const NaN", lambda h: _layout(h, "const").update(value=math.nan), None),
    ("keys miss a tensor", lambda h: h["spec"].update(keys=h["spec"]["keys"][:-1]), None),
    ("arch_args a list", lambda h: h["spec"].update(arch_args=[1]), None),
    ("arch_args wrong value type", lambda h: h["spec"]["arch_args"].update(num_classes="abc"), None),
    ("arch_args unknown argument", lambda h: h["spec"]["arch_args"].update(evil=1), None),
    ("arch unknown", lambda h: h["spec"].update(arch="not_a_model"), None),
    ("widths not an object", lambda h: h["spec"].update(widths=[1]), None),
    ("training a string", lambda h: h["spec"].update(training="yes"), None),
    ("short node features", None, lambda t: t.update(x=t["x"][:, :5].contiguous())),
    ("x int64", None, lambda t: _set(t, "x", lambda v: v.long())),
    ("x_mask float", None, lambda t: _set(t, "x_mask", lambda v: v.float())),
    ("NaN node feature", None, lambda t: _set(t, "x", lambda v: _put(v, 0, math.nan))),
    ("inf edge feature", None, lambda t: _set(t, "edges.k9.attr", lambda v: _put(v, 3, math.inf))),
    ("edge index out of range", None, _index(10**6)),
    ("edge index negative", None, _index(-1)),
    ("edge index 1-d", None, lambda t: _set(t, "edges.k9.index", lambda v: v.flatten())),
    ("edge attr rows short", None, lambda t: _set(t, "edges.k9.attr", lambda v: v[:-1])),
    ("edge attr float16", None, lambda t: _set(t, "edges.k1.attr", lambda v: v.half())),
    ("edge role out of range", None, lambda t: _set(t, "edges.k9.role", lambda v: _put(v, 0, 99))),
    ("node role negative", None, lambda t: _set(t, "node_role", lambda v: _put(v, 0, -3))),
    ("node depth int32", None, lambda t: _set(t, "node_depth", lambda v: v.int())),
    ("tensor missing", None, lambda t: t.pop("node_layer")),
    ("unexpected tensor", None, lambda t: t.update(evil=torch.zeros(3))),
]
RAW = [("metadata not JSON", "{"), ("deeply nested JSON", "[" * 100_000 + "]" * 100_000), ("metadata a number", "7")]


def _write(src: Path, dst: Path, head_fn=None, tensor_fn=None, raw: str | None = None) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    head = json.loads(meta[GRAPH_META_KEY])
    if head_fn is not None:
        new = head_fn(head)
        head = new if isinstance(new, list) else head
    if tensor_fn is not None:
        tensor_fn(tensors)
    save_file(tensors, str(dst), metadata={GRAPH_META_KEY: raw if raw is not None else json.dumps(head)})
    return dst


ALL = [pytest.param(h, t, None, id=n) for n, h, t in CASES] + [pytest.param(None, None, r, id=n) for n, r in RAW]


@pytest.mark.parametrize("head_fn,tensor_fn,raw", ALL)
def test_corrupt_graph_file_is_one_clear_error(graph_file, tmp_path, capsys, head_fn, tensor_fn, raw):
    bad = _write(graph_file, tmp_path / "bad.safetensors", head_fn, tensor_fn, raw)
    before = bad.read_bytes()
    with pytest.raises(GraphError):
        from_graph(Graph.load(bad))
    out = tmp_path / "out" / "model.safetensors"
    capsys.readouterr()
    assert main(["convert", str(bad), "--to-model", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
    assert bad.read_bytes() == before


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", None],
                         ids=["empty", "garbage", "no tensors", "truncated"])
def test_unreadable_graph_file(graph_file, tmp_path, capsys, data):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(graph_file.read_bytes()[:1000] if data is None else data)
    with pytest.raises(GraphError):
        Graph.load(bad)
    assert main(["convert", str(bad), "--to-model", "-o", str(tmp_path / "m.safetensors"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad} is not a") and err.count("\n") == 1
    with pytest.raises(GraphError, match="does not exist"):
        Graph.load(tmp_path / "missing.safetensors")


def test_good_file_still_loads_and_in_memory_dtype_names_are_whitelisted(graph_file):
    g = Graph.load(graph_file)
    assert from_graph(g) is not None
    g.spec = {**g.spec, "layout": [dict(e) for e in g.spec["layout"]]}
    g.spec["layout"][0]["dtype"] = "load"
    with pytest.raises(GraphError, match="unknown tensor dtype 'load'"):
        graph_params(g)
