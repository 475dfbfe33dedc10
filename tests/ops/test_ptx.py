"""Every Triton kernel compiles to PTX for sm_90 and sm_80, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole
NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) on this CPU-only machine.
It must run in a process WITHOUT ``TRITON_INTERPRET=1`` (the interpreter replaces the
jit functions), so the test re-runs this file as a script in a subprocess with the
variable removed and a fresh Triton cache (a cache hit would skip the compile).

The variants are not written by hand: each comes from a launcher's own ``plan_*``
function (the one the launcher runs) on real tensors (fp32/bf16/fp16/fp64, contiguous and
transposed views, trend modes, WRITE_PREV, in-place out=), and its signature,
constexprs, alignment attributes and compile options are derived by Triton's own binder
(``create_function_from_signature`` + ``JITFunction._pack_args``, what
``JITFunction.run`` does on a GPU) for the target's backend. So the PTX compiled here is
the PTX a GPU call with those arguments would compile. The script prints one JSON
object; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="compiling the Triton kernels needs the triton package")


def _variants():
    """(label, Launch) for every variant, each built by the launcher's own plan function."""
    import torch
    from fastcache.kernels import _partials, decision, gated_residual, modulated_rel_l1, rel_l1, residual

    lowp = (torch.float32, torch.bfloat16, torch.float16)
    B, N, D = 2, 256, 1152  # DiT-XL/2 256px tokens

    def name(dt):
        return str(dt).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")

    def layouts(dt):
        x = torch.randn(B, N, D).to(dt)
        return {"contig": x, "tview": torch.randn(B, D, N).to(dt).transpose(1, 2)}

    out = []
    for dt in (*lowp, torch.float64):
        for lay, x in layouts(dt).items():
            shift, scale = torch.randn(B, D).to(dt), torch.randn(B, D).to(dt)
            prev = torch.zeros(B, N, D, dtype=dt)
            launch, partials = modulated_rel_l1.plan_modulated_rel_l1(x, shift, scale, 1e-6, prev)
            out.append((f"modulated_rel_l1[{name(dt)},{lay}]", launch))
            for write in (True, False) if lay == "contig" else (True,):
                launch, _ = rel_l1.plan_rel_l1(x, prev, write)
                out.append((f"rel_l1[{name(dt)},{lay},write_prev={write}]", launch))
        if not any(lab == f"sum_partials[{name(partials.dtype)}]" for lab, _ in out):
            out.append((f"sum_partials[{name(partials.dtype)}]", _partials.plan_finish_sums(partials)[0]))
    for tdt in (torch.float32, torch.bfloat16, torch.float64):
        state = torch.zeros(16 + 3 * 64)
        launch, _ = decision.plan_cache_decision(
            torch.rand(B, 2), torch.tensor([999.0]).to(tdt), torch.tensor([1.0, 0.5]), state, 0.25, 1, 0, 28
        )
        out.append((f"decision[t={name(tdt)}]", launch))
    # the hold (repeated-call) variants and the timestep guard (tests/ops/test_hold.py)
    hold = torch.tensor(True)
    x, prev = torch.randn(B, N, D), torch.zeros(B, N, D)
    shift, scale = torch.randn(B, D), torch.randn(B, D)
    launch, _ = modulated_rel_l1.plan_modulated_rel_l1(x, shift, scale, 1e-6, prev, hold)
    out.append(("modulated_rel_l1[fp32,contig,hold]", launch))
    out.append(("rel_l1[fp32,contig,write_prev=True,hold]", rel_l1.plan_rel_l1(x, prev, True, hold)[0]))
    state = torch.zeros(16 + 3 * 64)
    launch, _ = decision.plan_cache_decision(
        torch.rand(B, 2), torch.tensor([999.0]), torch.tensor([1.0, 0.5]), state, 0.25, 1, 0, 28, hold
    )
    out.append(("decision[t=fp32,hold]", launch))
    # First-Block Cache's no-accumulation mode (tests/runtime/test_first_block.py)
    launch, _ = decision.plan_cache_decision(
        torch.rand(B, 2), torch.tensor([999.0]), torch.tensor([]), state, 0.05, 1, 0, 28, hold, False
    )
    out.append(("decision[t=fp32,hold,accumulate=False]", launch))
    for tdt, steps in ((torch.float32, 28), (torch.float32, 0), (torch.int64, 28)):
        t = torch.tensor([999.0]).to(tdt)
        launch = decision.plan_timestep_guard(t, state, torch.zeros(4), 1e-5, 1e-7, steps)[0]
        out.append((f"timestep_guard[t={name(tdt)},num_steps={steps}]", launch))
    for dt in lowp:
        for lay, x in layouts(dt).items():
            gate, cached = torch.randn(B, D).to(dt), torch.randn(B, N, D).to(dt)
            o = torch.empty(B, N, D, dtype=dt)
            modes = (
                ("none", None, 0.0),
                ("channel", torch.randn(D).to(dt), 0.1),
                ("token", torch.randn(N, D).to(dt), 0.1),
            )
            for mode, trend, w in modes if lay == "contig" else modes[:1]:
                launch = gated_residual.plan_gated_residual(x, gate, cached, trend, w, o)
                out.append((f"gated_residual[{name(dt)},{lay},trend={mode}]", launch))
            launch = residual.plan_apply_residual(x, cached, torch.empty_like(x))
            out.append((f"apply_residual[{name(dt)},{lay}]", launch))
            if lay == "contig":
                out.append((f"apply_residual_out[{name(dt)},inplace]", residual.plan_apply_residual(x, cached, x)))
            r = torch.zeros(B, N, D, dtype=dt)
            launch = residual.plan_store_residual(x, cached, torch.tensor(True), r)
            out.append((f"store_residual[{name(dt)},{lay}]", launch))
    # TaylorSeer (tests/runtime/test_taylorseer.py): orders 0-2, every dtype
    from fastcache.kernels import taylor

    dx, valid, store = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor(True)
    for dt in (*lowp, torch.float64):
        for order in (0, 1, 2):
            hist, f = torch.randn(order + 1, B, N, D).to(dt), torch.randn(B, N, D).to(dt)
            launch = taylor.plan_taylor_forecast(hist, dx, torch.empty(B, N, D, dtype=dt))
            out.append((f"taylor_forecast[{name(dt)},order={order}]", launch))
            launch = taylor.plan_taylor_update(hist, f, dx, valid, store)
            out.append((f"taylor_update[{name(dt)},order={order}]", launch))
            w = torch.ones(order + 1)  # the fitted filler (docs/methods.md section 12)
            launch = taylor.plan_history_combine(hist, w, torch.empty(B, N, D, dtype=dt))
            out.append((f"history_combine[{name(dt)},order={order}]", launch))
    return out


def _specialise(launch, target):
    """signature, constexprs, attrs and options exactly as JITFunction.run derives them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, **launch.options}
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _compile_all(caps: tuple[int, ...]) -> dict:
    """Compile every variant for every capability; also the decision kernel WITH fusion
    (a control showing what the launcher's options prevent)."""
    import dataclasses
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(launch, cap, override=None):
        target = GPUTarget("cuda", cap, 32)
        sig, cx, attrs, opts = _specialise(launch, target)
        opts = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else dict(opts.__dict__)
        opts.update(override or {})
        src = ASTSource(fn=launch.kernel, signature=sig, constexprs=cx, attrs=attrs)
        return triton.compile(src, target=target, options=opts), sig

    results = []
    t0 = time.perf_counter()
    variants = _variants()
    for cap in caps:
        for label, launch in variants:
            k, sig = build(launch, cap)
            results.append(
                {
                    "label": label,
                    "cap": cap,
                    "entry": launch.kernel.__name__,
                    "signature": {k_: str(v) for k_, v in sig.items()},
                    "ptx": k.asm["ptx"],
                    "ttir": k.asm["ttir"],
                    "has_cubin": bool(k.asm.get("cubin")),
                }
            )
    decision_launch = next(v[1] for v in variants if v[0] == "decision[t=fp32]")
    fused, _ = build(decision_launch, 90, {"enable_fp_fusion": True})
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
    env["FASTCACHE_BACKEND"] = "eager"  # importing fastcache must not need the C++ extension
    env["FASTCACHE_SKIP_EXT"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, "90", "80"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"PTX compile subprocess failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_for_sm90_and_sm80(compiled):
    results = compiled["results"]
    labels = {r["label"] for r in results}
    assert len(results) == 2 * len(labels)
    for r in results:
        target = re.search(r"^\.target (sm_\d+a?)\b", r["ptx"], re.MULTILINE)
        assert target, f"{r['label']} sm_{r['cap']}: no .target line in the PTX"
        assert target.group(1).rstrip("a") == f"sm_{r['cap']}", f"{r['label']}: {target.group(0)} for sm_{r['cap']}"
        assert re.search(rf"\.entry {r['entry']}\b", r["ptx"]), f"{r['label']}: entry {r['entry']} missing"
        assert r["has_cubin"], f"{r['label']} sm_{r['cap']}: ptxas produced no cubin"
    kinds = {lab.split("[")[0] for lab in labels}
    assert kinds == {"modulated_rel_l1", "rel_l1", "sum_partials", "decision", "gated_residual",
                     "apply_residual", "apply_residual_out", "store_residual", "timestep_guard",
                     "taylor_forecast", "taylor_update", "history_combine"}  # fmt: skip


def test_signatures_come_from_the_launchers_arguments(compiled):
    """The specialisation is the launcher's: a contiguous x has its unit column stride
    specialised to the constant 1 (vector loads), a transposed view passes a runtime
    stride; the decision kernel keeps its int arguments as runtime i32."""
    by_label = {r["label"]: r["signature"] for r in compiled["results"] if r["cap"] == 90}
    contig, tview = by_label["apply_residual[fp32,contig]"], by_label["apply_residual[fp32,tview]"]
    assert contig["sxd"] == "constexpr" and tview["sxd"] != "constexpr", (contig, tview)
    assert tview["sxn"] == "constexpr", "a (N*D, 1, N) view has token stride 1"
    assert by_label["gated_residual[bf16,contig,trend=none]"]["x_ptr"] == "*bf16"
    assert by_label["modulated_rel_l1[fp64,contig]"]["partials_ptr"] == "*fp64"
    # hold: the launchers pass the bool flag itself (the kernel loads it); without it the
    # HAS_HOLD branch is compiled out
    for label in ("modulated_rel_l1[fp32,contig,hold]", "rel_l1[fp32,contig,write_prev=True,hold]",
                  "decision[t=fp32,hold]"):  # fmt: skip
        assert by_label[label]["hold_ptr"] == "*u1" and by_label[label]["HAS_HOLD"] == "constexpr", label
    assert by_label["timestep_guard[t=fp32,num_steps=28]"]["hold_ptr"] == "*u1"


def test_taylor_update_loads_store_and_orders_unroll(compiled):
    """The update kernel loads its store flag on the device (a byte load: no host read),
    and the order loop is unrolled per ORDER (more loads for a higher order)."""
    ptx = {r["label"]: r["ptx"] for r in compiled["results"] if r["cap"] == 90}
    load_u8 = re.compile(r"ld\.global(\.\w+)*\.[us]8|ld\.global(\.\w+)*\.b8")
    assert load_u8.search(ptx["taylor_update[fp32,order=1]"]), "no byte load of the store flag"
    assert not load_u8.search(ptx["taylor_forecast[fp32,order=1]"])
    n_ld = [len(re.findall(r"ld\.global", ptx[f"taylor_forecast[fp32,order={k}]"])) for k in (0, 1, 2)]
    assert n_ld[0] < n_ld[1] < n_ld[2], n_ld


def test_hold_is_loaded_in_the_kernel(compiled):
    """With HAS_HOLD the kernel reads the flag on the device (a predicated 8-bit load) and
    its stores depend on it; without it there is no such load."""
    ptx = {r["label"]: r["ptx"] for r in compiled["results"] if r["cap"] == 90}
    load_u8 = re.compile(r"ld\.global(\.\w+)*\.[us]8|ld\.global(\.\w+)*\.b8")
    for with_hold, without in (
        ("modulated_rel_l1[fp32,contig,hold]", "modulated_rel_l1[fp32,contig]"),
        ("rel_l1[fp32,contig,write_prev=True,hold]", "rel_l1[fp32,contig,write_prev=True]"),
        ("decision[t=fp32,hold]", "decision[t=fp32]"),
    ):
        assert load_u8.search(ptx[with_hold]), f"{with_hold}: no byte load of the hold flag"
        assert not load_u8.search(ptx[without]), f"{without}: a byte load without a hold flag"


def test_decision_ptx_is_ieee_and_uncontracted(compiled):
    """The launcher's options keep Horner as mul.rn + add.rn and the ratio as div.rn.

    Control: the same kernel compiled with fusion on contains an fma, so the absence
    check below can fail.
    """
    assert "fma.rn.f32" in compiled["decision_fused_ptx"]
    for r in compiled["results"]:
        if r["label"].startswith("timestep_guard"):  # tol = scale * rtol + atol, rounded twice
            assert "fma.rn.f32" not in r["ptx"], f"{r['label']} sm_{r['cap']}: tolerance contracted into an FMA"
            assert ".ftz" not in r["ptx"], f"{r['label']}: flushes denormals, the reference does not"
        if r["label"].startswith("decision"):
            ptx = r["ptx"]
            assert "fma.rn.f32" not in ptx, f"{r['label']} sm_{r['cap']}: Horner contracted into an FMA"
            assert "div.rn.f32" in ptx, f"{r['label']} sm_{r['cap']}: ratio division is not IEEE div.rn"
            assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx
            assert ".ftz" not in ptx, f"{r['label']}: flushes denormals, the reference does not"


def test_bf16_outputs_round_to_nearest_on_gpu(compiled):
    """On hardware the bf16 outputs round to nearest; only the interpreter truncates
    (tests/ops/test_triton.py models that).

    Either an explicit ``cvt.rn.bf16.f32``, or, where the fp32 math is one add/sub of two
    bf16 values (apply/store_residual), LLVM folds ``bf16(f32(a) + f32(b))`` into a
    native round-to-nearest ``add.bf16`` / ``sub.bf16`` / ``fma.rn.bf16``: the same
    bits, because fp32's 24-bit significand is >= 2*8+2 bits (no double rounding).
    """
    rn = re.compile(r"cvt\.rn(\.relu)?\.bf16(x2)?\.f32|\b(add|sub)(\.rn)?\.bf16(x2)?\b|fma\.rn\.bf16")
    checked = 0
    for r in compiled["results"]:
        if "bf16" in r["label"] and r["label"].startswith(("modulated", "gated", "apply", "store")):
            checked += 1
            assert rn.search(r["ptx"]), f"{r['label']} sm_{r['cap']}: no round-to-nearest bf16 conversion"
            assert not re.search(r"cvt\.rz\S*bf16", r["ptx"]), f"{r['label']} sm_{r['cap']}: truncating cvt"
    assert checked == 2 * 11  # per cap: modulated 2, gated 4, apply 2, apply_out 1, store 2 (see _variants)


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
            assert "i64" in offset_types, f"{r['label']}: no 64-bit tensor offsets in the TTIR"


def test_taylor_history_offsets_are_int64(compiled):
    """The history's k-th slice starts at k * E: with E < 2^31 (an i32 argument) but
    (ORDER + 1) * E past it (Wan 14B at 720p, order >= 3), an i32 product wraps. The
    order-2 kernels multiply in i64 only: no i32 multiply in their TTIR."""
    seen = 0
    for r in compiled["results"]:
        if r["label"].startswith(("taylor_forecast", "taylor_update")) and "order=2" in r["label"]:
            seen += 1
            i32_products = re.findall(r"arith\.muli [^\n]*: i32\b", r["ttir"])
            assert not i32_products, f"{r['label']}: i32 products in the TTIR: {i32_products}"
    assert seen >= 2


if __name__ == "__main__":
    caps = tuple(int(c) for c in sys.argv[1:]) or (90, 80)
    print(json.dumps(_compile_all(caps)))
