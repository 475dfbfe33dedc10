"""Every Triton kernel compiles to PTX for sm_90 and sm_80, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole
NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) on this CPU-only machine.
It must run in a process WITHOUT ``TRITON_INTERPRET=1`` (the interpreter replaces the
jit functions), so the test re-runs this file as a script in a subprocess with the
variable removed and a fresh Triton cache (a cache hit would skip the compile).

The variants are the ones the launchers can produce: input dtypes fp32/bf16/fp16
(fp64 where the kernel has an fp64 accumulation mode), trend modes, WRITE_PREV, and the
decision kernel with the launcher's own compile options. The script prints one JSON
object; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip(
    "triton", reason="compiling the Triton kernels needs the triton package"
)

PTR_TYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}
LOWP = ("fp32", "bf16", "fp16")


def _variants():
    """(label, jit function, signature, constexprs, compile options) for every variant."""
    from fastcache.kernels import (
        _partials,
        decision,
        gated_residual,
        modulated_rel_l1,
        rel_l1,
        residual,
    )

    out = []
    for dt in (*LOWP, "fp64"):
        p = PTR_TYPES[dt]
        acc = "*fp64" if dt == "fp64" else "*fp32"
        sig = {
            "x_ptr": p, "shift_ptr": p, "scale_ptr": p, "prev_ptr": p, "partials_ptr": acc,
            "N": "i32", "D": "i32", "P": "i32", "eps": "fp32",
            "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "ACC_FP64": "constexpr",
        }  # fmt: skip
        for bn, bd in ((1, 4096), (4, 1024)):
            out.append(
                (f"modulated_rel_l1[{dt},{bn}x{bd}]", modulated_rel_l1._modulated_rel_l1_kernel, sig,
                 {"BLOCK_N": bn, "BLOCK_D": bd, "ACC_FP64": dt == "fp64"}, {})
            )  # fmt: skip
        for write in (True, False):
            sig = {
                "x_ptr": p, "prev_ptr": p, "partials_ptr": acc, "M": "i32", "P": "i32",
                "BLOCK": "constexpr", "WRITE_PREV": "constexpr", "ACC_FP64": "constexpr",
            }  # fmt: skip
            out.append(
                (f"rel_l1[{dt},write_prev={write}]", rel_l1._rel_l1_partials_kernel, sig,
                 {"BLOCK": 4096, "WRITE_PREV": write, "ACC_FP64": dt == "fp64"}, {})
            )  # fmt: skip
    for acc in ("*fp32", "*fp64"):
        sig = {"partials_ptr": acc, "out_ptr": acc, "P": "i32", "BLOCK_P": "constexpr"}
        out.append(
            (
                f"sum_partials[{acc}]",
                _partials._sum_partials_kernel,
                sig,
                {"BLOCK_P": 1024},
                {},
            )
        )
    for tdt in ("fp32", "bf16", "fp64"):
        sig = {
            "sums_ptr": "*fp32", "t_ptr": PTR_TYPES[tdt], "coeffs_ptr": "*fp32", "state_ptr": "*fp32",
            "flag_ptr": "*i1", "B": "i32", "n_coeffs": "i32", "H": "i32", "threshold": "fp32",
            "min_steps": "i32", "last_step": "i32", "max_skips": "i32", "has_last": "i32",
            "has_max_skips": "i32", "caching_off": "i32",
        }  # fmt: skip
        out.append(
            (
                f"decision[t={tdt}]",
                decision._cache_decision_kernel,
                sig,
                {},
                dict(decision.COMPILE_OPTIONS),
            )
        )
    for dt in LOWP:
        p = PTR_TYPES[dt]
        for has_trend, per_token in ((False, False), (True, False), (True, True)):
            sig = {
                "x_ptr": p, "gate_ptr": p, "cached_ptr": p, "trend_ptr": p, "out_ptr": p,
                "R": "i32", "N": "i32", "D": "i32", "w": "fp32",
                "BLOCK_R": "constexpr", "BLOCK_D": "constexpr", "HAS_TREND": "constexpr",
                "TREND_PER_TOKEN": "constexpr", "ACC_FP64": "constexpr",
            }  # fmt: skip
            cx = {"BLOCK_R": 4, "BLOCK_D": 1024, "HAS_TREND": has_trend, "TREND_PER_TOKEN": per_token,
                  "ACC_FP64": False}  # fmt: skip
            out.append((f"gated_residual[{dt},trend={has_trend},per_token={per_token}]",
                        gated_residual._gated_residual_kernel, sig, cx, {}))  # fmt: skip
        sig = {
            "x_ptr": p,
            "r_ptr": p,
            "out_ptr": p,
            "numel": "i32",
            "BLOCK": "constexpr",
            "ACC_FP64": "constexpr",
        }
        out.append(
            (
                f"apply_residual[{dt}]",
                residual._apply_residual_kernel,
                sig,
                {"BLOCK": 4096, "ACC_FP64": False},
                {},
            )
        )
        sig = {"out_ptr": p, "x_in_ptr": p, "flag_ptr": "*i1", "r_ptr": p, "numel": "i32",
               "BLOCK": "constexpr", "ACC_FP64": "constexpr"}  # fmt: skip
        out.append(
            (
                f"store_residual[{dt}]",
                residual._store_residual_kernel,
                sig,
                {"BLOCK": 4096, "ACC_FP64": False},
                {},
            )
        )
    return out


def _compile_all(caps: tuple[int, ...]) -> dict:
    """Compile every variant for every capability; also the decision kernel WITH fusion
    (a control showing what the launcher's options prevent)."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, sig, cx, opts, cap):
        # 16-byte alignment hints on pointers, as the launcher's specialisation gives them
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, (k, v) in enumerate(sig.items())
            if v.startswith("*")
        }
        src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)

    results = []
    t0 = time.perf_counter()
    variants = _variants()
    for cap in caps:
        for label, fn, sig, cx, opts in variants:
            k = build(fn, sig, cx, opts, cap)
            results.append(
                {
                    "label": label,
                    "cap": cap,
                    "entry": fn.__name__,
                    "ptx": k.asm["ptx"],
                    "ttir": k.asm["ttir"],
                    "has_cubin": bool(k.asm.get("cubin")),
                }
            )
    from fastcache.kernels import decision

    sig = next(v[2] for v in variants if v[0] == "decision[t=fp32]")
    fused = build(
        decision._cache_decision_kernel, sig, {}, {"enable_fp_fusion": True}, 90
    )
    return {
        "results": results,
        "decision_fused_ptx": fused.asm["ptx"],
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------- test
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env["FASTCACHE_BACKEND"] = (
        "eager"  # importing fastcache must not need the C++ extension
    )
    env["FASTCACHE_SKIP_EXT"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, "90", "80"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"PTX compile subprocess failed:\n{proc.stderr[-6000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_for_sm90_and_sm80(compiled):
    results = compiled["results"]
    labels = {r["label"] for r in results}
    assert len(results) == 2 * len(labels)
    for r in results:
        target = re.search(r"^\.target (sm_\d+a?)\b", r["ptx"], re.MULTILINE)
        assert target, f"{r['label']} sm_{r['cap']}: no .target line in the PTX"
        assert target.group(1).rstrip("a") == f"sm_{r['cap']}", (
            f"{r['label']}: {target.group(0)} for sm_{r['cap']}"
        )
        assert re.search(rf"\.entry {r['entry']}\b", r["ptx"]), (
            f"{r['label']}: entry {r['entry']} missing"
        )
        assert r["has_cubin"], f"{r['label']} sm_{r['cap']}: ptxas produced no cubin"
    kinds = {lab.split("[")[0] for lab in labels}
    assert kinds == {"modulated_rel_l1", "rel_l1", "sum_partials", "decision", "gated_residual",
                     "apply_residual", "store_residual"}  # fmt: skip


def test_decision_ptx_is_ieee_and_uncontracted(compiled):
    """The launcher's options keep Horner as mul.rn + add.rn and the ratio as div.rn.

    Control: the same kernel compiled with fusion on contains an fma, so the absence
    check below can fail.
    """
    assert "fma.rn.f32" in compiled["decision_fused_ptx"]
    for r in compiled["results"]:
        if r["label"].startswith("decision"):
            ptx = r["ptx"]
            assert "fma.rn.f32" not in ptx, (
                f"{r['label']} sm_{r['cap']}: Horner contracted into an FMA"
            )
            assert "div.rn.f32" in ptx, (
                f"{r['label']} sm_{r['cap']}: ratio division is not IEEE div.rn"
            )
            assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx
            assert ".ftz" not in ptx, (
                f"{r['label']}: flushes denormals, the reference does not"
            )


def test_bf16_outputs_round_to_nearest_on_gpu(compiled):
    """On hardware the bf16 outputs round to nearest; only the interpreter truncates
    (tests/ops/test_triton.py models that).

    Either an explicit ``cvt.rn.bf16.f32``, or, where the fp32 math is one add/sub of two
    bf16 values (apply/store_residual), LLVM folds ``bf16(f32(a) + f32(b))`` into a
    native round-to-nearest ``add.bf16`` / ``sub.bf16`` / ``fma.rn.bf16``: the same
    bits, because fp32's 24-bit significand is >= 2*8+2 bits (no double rounding).
    """
    rn = re.compile(
        r"cvt\.rn(\.relu)?\.bf16(x2)?\.f32|\b(add|sub)(\.rn)?\.bf16(x2)?\b|fma\.rn\.bf16"
    )
    checked = 0
    for r in compiled["results"]:
        if "bf16" in r["label"] and r["label"].startswith(
            ("modulated", "gated", "apply", "store")
        ):
            checked += 1
            assert rn.search(r["ptx"]), (
                f"{r['label']} sm_{r['cap']}: no round-to-nearest bf16 conversion"
            )
            assert not re.search(r"cvt\.rz\S*bf16", r["ptx"]), (
                f"{r['label']} sm_{r['cap']}: truncating cvt"
            )
    assert checked == 2 * 7


def test_int64_offsets_where_numel_can_pass_2_31(compiled):
    """Tensor pointer offsets into x/prev/out are i64 in the TTIR (B*N*D may pass 2^31)."""
    for r in compiled["results"]:
        if r["label"].startswith(
            (
                "apply_residual",
                "store_residual",
                "rel_l1",
                "gated_residual",
                "modulated",
            )
        ):
            offset_types = re.findall(
                r"tt\.addptr .*: tensor<[^>]*!tt\.ptr<\w+>>, tensor<(?:\d+x)+(i\d+)>",
                r["ttir"],
            )
            assert "i64" in offset_types, (
                f"{r['label']}: no 64-bit tensor offsets in the TTIR"
            )


if __name__ == "__main__":
    caps = tuple(int(c) for c in sys.argv[1:]) or (90, 80)
    print(json.dumps(_compile_all(caps)))
