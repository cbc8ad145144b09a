"""Lazy public names of the root package, plots and widgets (vitlens_patch.lazy)."""

import subprocess
import sys

import pytest

import vitlens_patch
from vitlens_patch import plots, widgets


@pytest.mark.parametrize("package", [vitlens_patch, plots, widgets])
def test_dir_lists_all_and_unknown_names_raise_naming_the_package(package):
    assert dir(package) == package.__all__
    with pytest.raises(AttributeError, match=rf"module '{package.__name__}' has no attribute 'nope'"):
        package.nope  # noqa: B018


def test_names_and_submodules_resolve_on_access():
    from vitlens_patch.patching import run_restore
    from vitlens_patch.plots.tracing import plot_layer_curve

    assert vitlens_patch.run_restore is run_restore
    assert vitlens_patch.plots is plots
    assert plots.plot_layer_curve is plot_layer_curve


def test_importing_the_packages_loads_no_torch():
    code = "import sys, vitlens_patch, vitlens_patch.plots, vitlens_patch.widgets; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
