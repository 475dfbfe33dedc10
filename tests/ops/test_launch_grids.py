"""Every Triton launcher's grid stays inside CUDA's limits at the token grids of published
models (gridDim.x < 2^31, gridDim.y and .z <= 65535). The interpreter has no such limits and
the PTX tests only compile, so a grid over them shows nowhere else before a GPU launch fails
with "invalid argument". Grids are planned on meta tensors: nothing is allocated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_grids", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_launch_grid_fits_cuda_limits_at_published_shapes(gpu_check):
    shapes = gpu_check._model_grids()
    # the long videos: HunyuanVideo 720p x 129 frames, Wan 2.1 14B 720p x 81 frames
    assert shapes["hunyuanvideo-720p-129f"][1] == 118800 and shapes["wan2.1-14b-720p-81f"][1] == 75600
    over = []
    for model, shape in shapes.items():
        grids = gpu_check._planned_grids(shape)
        assert {"rel_l1_sums", "modulated_rel_l1_sums", "taylor_forecast", "apply_residual"} <= set(grids)
        for op, grid in grids.items():
            if any(g > lim for g, lim in zip(grid, gpu_check.CUDA_GRID_MAX, strict=False)):
                over.append((op, model, grid))
    assert over == []
