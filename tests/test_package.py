"""The shape of the `unet` package: its public API, and the rules its imports follow
(command-line tools side by side, project imports at the top of modules, no cycles)."""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

import unet
from unet import losses, metrics, model, postprocess

PACKAGE = Path(unet.__file__).parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))
COMMAND_LINE_MODULES = ("train", "predict", "evaluate")


def project_imports(module: str) -> list[tuple[str, bool]]:
    """(imported unet module, imported at the module's top level) for each project import of `module`."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "unet":
            parts = node.module.split(".")
            names = parts[1:2] or [alias.name for alias in node.names]  # `from unet import x` names modules
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("unet.")]
        else:
            continue
        found += [(name, id(node) in top_level) for name in names if name in MODULES]
    return found


def test_the_public_api_is_exported_from_the_package():
    expected = {
        "AttentionUNet": model.AttentionUNet, "UNetConfig": model.UNetConfig, "build_model": model.build_model,
        "SegmentationOutput": model.SegmentationOutput, "to_probabilities": model.to_probabilities,
        "SegmentationLoss": losses.SegmentationLoss, "ConfusionMatrix": metrics.ConfusionMatrix,
        "argmax_labels": postprocess.argmax_labels, "boundary_from_labels": postprocess.boundary_from_labels,
        "close_gaps": postprocess.close_gaps, "segment": postprocess.segment, "dust_fill": postprocess.dust_fill,
        "boundary_regions": postprocess.boundary_regions, "prepare_boundary": postprocess.prepare_boundary,
    }
    assert sorted(unet.__all__) == sorted(expected)
    for name, value in expected.items():
        assert getattr(unet, name) is value, name
    # the module keeps its name: its chain function is not exported over it
    assert unet.postprocess is postprocess and callable(unet.postprocess.postprocess)


@pytest.mark.parametrize("module", COMMAND_LINE_MODULES)
def test_command_line_modules_import_no_other_command_line_module(module):
    imported = {name for name, _ in project_imports(module)}
    assert imported.isdisjoint(COMMAND_LINE_MODULES), imported & set(COMMAND_LINE_MODULES)
    assert "inference" in imported  # the one path they share


def test_project_imports_sit_at_the_top_of_modules():
    inside_functions = {module: [name for name, top in project_imports(module) if not top] for module in MODULES}
    assert {module: names for module, names in inside_functions.items() if names} == {}


def test_project_imports_have_no_cycle():
    graph = {module: {name for name, _ in project_imports(module)} - {module} for module in MODULES}
    order = graphlib.TopologicalSorter(graph).static_order()  # raises CycleError on a cycle
    assert sorted(order) == MODULES


def test_import_unet_loads_neither_the_tools_nor_optional_dependencies():
    code = "import sys, unet; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                cwd=PACKAGE.parent).stdout.split())
    assert "unet.model" in loaded and "unet.postprocess" in loaded
    unwanted = {f"unet.{name}" for name in (*COMMAND_LINE_MODULES, "data", "inference", "checkpoint")}
    unwanted |= {"localattn", "torch.utils.tensorboard"}
    assert loaded.isdisjoint(unwanted), loaded & unwanted
