"""What ``flctl model inspect`` shows: a verified package's fields, its parameter counts and each graph's op set."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from appliance.modelpkg import ModelPackage


class GraphError(ValueError):
    """A graph of a verified package that does not parse as ONNX (the signature vouches for who made it, not that
    it is a model)."""


def graph_info(graph: bytes, name: str = "the") -> dict[str, Any]:
    """Opset, IR version, node count, op counts (nested functions included) and baked constants of a graph."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(graph)
    except DecodeError as exc:
        raise GraphError(f"its {name} graph ({len(graph)} bytes) is not an ONNX model: {exc}") from None
    ops: Counter[str] = Counter()
    for node in model.graph.node:
        ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
    for function in model.functions:
        for node in function.node:
            ops[node.op_type] += 1
    constants = 0
    for tensor in model.graph.initializer:
        size = 1
        for d in tensor.dims:
            size *= d
        constants += size
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "bytes": len(graph),
        "opset": opset,
        "ir_version": model.ir_version,
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "constant_values": constants,
    }


def describe(pkg: ModelPackage) -> dict[str, Any]:
    """The package summary plus parameter counts by role and the op set of every graph."""
    summary = pkg.summary()
    sizes = {s.name: s.size for s in pkg.param_specs}
    stats = set(pkg.buffer_names)
    summary["trainable_parameters"] = sum(v for k, v in sizes.items() if k not in stats)
    summary["running_statistics"] = sum(sizes[k] for k in stats if k in sizes) + sum(
        int(v.size) for v in pkg.local_buffers.values())
    graphs = {"training": pkg.training_graph, "inference": pkg.inference_graph}
    if pkg.evaluation_graph:
        graphs["evaluation"] = pkg.evaluation_graph
    summary["graphs"] = {name: graph_info(g, name) for name, g in graphs.items()}
    return summary


def format_text(d: dict[str, Any]) -> str:
    """``describe``'s result for people."""
    labels = d["labels"]
    kind = "class index" if labels["dtype"] == "int64" else "target"
    shape = "x".join(map(str, labels["shape"])) or "one per sample"
    lines = [
        f"{d['name']}  digest {d['digest']}  (signature verified)",
        f"  task: {d['task']}",
        f"  labels: {labels['dtype']} {kind}, {shape}",
        f"  classes ({d['num_classes']}): {', '.join(d['class_names'])}",
        f"  parameters: {d['parameters']} in updates: {d['trainable_parameters']} trained"
        + (f" + {d['running_statistics']} running statistics ({d['buffers']['policy']})"
           if d["buffers"]["names"] and d["buffers"]["policy"] == "aggregate" else ""),
    ]
    if d["buffers"]["names"] and d["buffers"]["policy"] == "local":
        lines.append(f"  running statistics kept on the device (local): {d['running_statistics']}")
    for p in d["param_specs"]:
        lines.append(f"    {p['name']:<32} {'x'.join(map(str, p['shape'])):<14} {p['dtype']}")
    lines += [
        f"  optimizer: {json.dumps(d['optimizer'])}",
        f"  preprocessing: {json.dumps(d['preprocessing'])}",
    ]
    for name, g in d["graphs"].items():
        lines.append(f"  {name} graph: {g['bytes']} B, opset {g['opset']}, IR {g['ir_version']}, {g['nodes']} nodes, "
                     f"{g['constant_values']} constant values (frozen parameters included)")
        lines.append("    ops: " + ", ".join(f"{op} {n}" for op, n in g["ops"].items()))
    return "\n".join(lines)
