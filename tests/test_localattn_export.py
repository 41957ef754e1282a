"""Deployment of LocalAttention2d: torch.export keeps the custom op; torch.onnx.export (dynamo)
with the default backend traces the reference path into standard ONNX ops, which onnxruntime
runs like eager (docs/local-attention.md, "Export")."""

import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

import localattn
from localattn.functional import kernel_available
from unet.model import build_model

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter is written with it

FORWARD_OP = torch.ops.localattn.local_attention2d_forward.default


def attention_model(block_size=2, symmetric=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        localattn.LocalAttention2d(12, 12, heads=3, block_size=block_size, symmetric=symmetric),
    ).eval()


def export_to_onnxruntime(model, x, **options):
    """torch.onnx.export(model, (x,), dynamo=True) -> (onnxruntime session runner, ONNX op types).

    A FallbackWarning here would mean that the exporter met the compiled op's fallback instead of
    the export path: it is turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", localattn.FallbackWarning)
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **options)
    model_proto = program.model_proto
    session = onnxruntime.InferenceSession(
        model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name

    def run(inputs):
        return [torch.from_numpy(out) for out in session.run(None, {name: inputs.numpy()})]

    op_types = {f"{node.domain}::{node.op_type}" for node in model_proto.graph.node}
    return run, op_types


def assert_standard_onnx(op_types):
    assert not any("localattn" in op or "local_attention" in op for op in op_types), op_types


def test_onnx_export_matches_eager():
    """A fixed-size export, H and W not multiples of the block size."""
    model = attention_model(block_size=2, symmetric=True)
    x = torch.randn(2, 3, 7, 5)
    run, op_types = export_to_onnxruntime(model, x)
    assert_standard_onnx(op_types)
    with torch.no_grad():
        expected = model(x)  # the compiled kernel on the CPU, where it is built
    torch.testing.assert_close(run(x)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size, symmetric", [(2, False), (3, True), (4, False)])
def test_onnx_export_with_dynamic_height_and_width(block_size, symmetric):
    """One export serves any H and W, multiples of the block size or not."""
    model = attention_model(block_size, symmetric)
    height, width = Dim("height", min=1, max=256), Dim("width", min=1, max=256)
    run, op_types = export_to_onnxruntime(
        model, torch.randn(2, 3, 8, 6), dynamic_shapes=({2: height, 3: width},)
    )
    assert_standard_onnx(op_types)
    for size in [(8, 6), (16, 16), (5, 11), (1, 1), (13, 9)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(
            run(x)[0], expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"size {size}: {m}"
        )


@pytest.mark.slow
def test_onnx_export_of_unet_with_local_attention():
    torch.manual_seed(0)
    model = build_model("tiny", local_attention_levels=(0, 1)).eval()
    x = torch.randn(1, 3, 32, 40)
    run, op_types = export_to_onnxruntime(model, x)
    assert_standard_onnx(op_types)
    with torch.no_grad():
        expected = model(x)
    for actual, wanted, name in zip(run(x), expected, expected._fields):
        torch.testing.assert_close(
            actual, wanted, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}"
        )


@pytest.mark.skipif(not kernel_available("cpu"), reason="localattn._C has no CPU kernel")
def test_torch_export_keeps_the_custom_op():
    model = attention_model(block_size=2, symmetric=True)
    x = torch.randn(2, 3, 7, 9)
    exported = torch.export.export(model, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert FORWARD_OP in targets
    other = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), model(other))
