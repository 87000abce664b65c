"""The Velvet Triton kernel against its plain-torch reference, through Triton's interpreter.

The tensors here are CPU tensors, and ``velvet_step`` runs the kernel on CPU tensors in
Triton's interpreter by itself (exactly what ``TRITON_INTERPRET=1`` selects), so this
module does not set that variable: setting it process-wide would also switch every other
test's kernels to the interpreter when the suite runs on a GPU machine.
"""

import re

import pytest
import torch
import triton

from vesper_sdk.kernels import velvet

BLOCK = 64  # small blocks: many programs and ragged segments on tiny tensors




def _clones(*tensors):
    return [t.clone() for t in tensors]


def _assert_same_update(kernel_out, reference_out, dtype):
    (p_k, m_k, v_k), (p_r, m_r, v_r) = kernel_out, reference_out
    torch.testing.assert_close(m_k, m_r, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v_k, v_r, rtol=1e-6, atol=1e-12)
    if dtype == torch.float32:
        torch.testing.assert_close(p_k, p_r, rtol=1e-6, atol=1e-7)
    else:
        # Same fp32 value rounded once: at most one unit in the last place apart (a tie
        # flipped by fp32 op-order rounding), and almost always bit-identical.
        ulp = (p_k.view(torch.int16).int() - p_r.view(torch.int16).int()).abs()
        assert ulp.max() <= 1
        assert (ulp == 0).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_matches_reference_on_random_ragged_layouts(dtype, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    # Sizes deliberately not multiples of the block, plus 1-element and empty tensors.
    numels = [int(x) for x in torch.randint(1, 5 * BLOCK, (6,), generator=gen)] + [1, 0, BLOCK]
    p, g, m, v, block_seg, hp = velvet.random_problem(numels, dtype, seed=seed, block=BLOCK)
    # Segment 2 is skipped (a parameter without a gradient this step).
    blocks = velvet.blocks_of_segments(block_seg, set(range(len(numels))) - {2})
    pk, mk, vk = _clones(p, m, v)
    pr, mr, vr = _clones(p, m, v)
    velvet.velvet_step(pk, g, mk, vk, block_seg, hp, blocks=blocks, block=BLOCK)
    velvet.velvet_reference(pr, g, mr, vr, block_seg, hp, blocks=blocks, block=BLOCK)
    _assert_same_update((pk, mk, vk), (pr, mr, vr), dtype)
    assert not torch.equal(pk, p), "the kernel did not update anything"


def test_skipped_segments_and_padding_are_left_alone():
    numels = [100, 37, 130]
    p, g, m, v, block_seg, hp = velvet.random_problem(numels, torch.float32, seed=3, block=BLOCK)
    # Padding holds zeros in the optimizer's buffers; a zero grad keeps it zero.
    starts = [0, 2 * BLOCK, 3 * BLOCK]
    for start, n, nb in zip(starts, numels, [2, 1, 3], strict=True):
        for t in (p, g, m, v):
            t[start + n:start + nb * BLOCK] = 0
    before = _clones(p, m, v)
    blocks = velvet.blocks_of_segments(block_seg, {0, 2})
    velvet.velvet_step(p, g, m, v, block_seg, hp, blocks=blocks, block=BLOCK)
    seg1 = slice(2 * BLOCK, 3 * BLOCK)
    for new, old in zip((p, m, v), before, strict=True):
        assert torch.equal(new[seg1], old[seg1])  # skipped: bit-identical
        for start, n, nb in zip(starts, numels, [2, 1, 3], strict=True):
            assert torch.all(new[start + n:start + nb * BLOCK] == 0)  # padding stays zero
    assert not torch.equal(p[:100], before[0][:100])


def test_tail_past_n_elements_is_not_touched():
    # An unpadded single tensor (how the per-tensor benchmark baseline launches).
    n = 3 * BLOCK + 5
    p, g, m, v, _, hp = velvet.random_problem([4 * BLOCK], torch.float32, seed=4, block=BLOCK)
    block_seg = torch.zeros(4, dtype=torch.int32)
    before = _clones(p, m, v)
    pr, mr, vr = _clones(p, m, v)
    velvet.velvet_step(p, g, m, v, block_seg, hp, n_elements=n, block=BLOCK)
    velvet.velvet_reference(pr, g, mr, vr, block_seg, hp, n_elements=n, block=BLOCK)
    for new, old, ref in zip((p, m, v), before, (pr, mr, vr), strict=True):
        assert torch.equal(new[n:], old[n:])
        torch.testing.assert_close(new, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_threshold_skips_small_gradient_elements(dtype):
    p, g, m, v, block_seg, hp = velvet.random_problem([300, 77], dtype, seed=5, block=BLOCK)
    g[::3] = 0  # exact zeros: skipped at threshold 0
    g[1::7] = 1e-4  # below a threshold of 1e-3
    thr = 1e-3
    before = _clones(p, m, v)
    pr, mr, vr = _clones(p, m, v)
    velvet.velvet_step(p, g, m, v, block_seg, hp, block=BLOCK, sparse_threshold=thr)
    velvet.velvet_reference(pr, g, mr, vr, block_seg, hp, block=BLOCK, sparse_threshold=thr)
    _assert_same_update((p, m, v), (pr, mr, vr), dtype)
    skipped = g.float().abs() <= thr
    for new, old in zip((p, m, v), before, strict=True):
        assert torch.equal(new[skipped], old[skipped])
        assert not torch.equal(new[~skipped], old[~skipped])


def test_bf16_store_rounds_to_nearest_even_like_torch():
    # step_size 0 and a decay that lands between bf16 values: the only work left is the
    # fp32 -> bf16 rounding, which must equal torch's (Triton's interpreter truncates).
    n = 4 * BLOCK
    p = torch.randn(n).bfloat16()
    g, m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n), torch.zeros(n)
    hp = torch.tensor([[1.0 + 3.1e-3, 0.1, 0.999, 1e-3, 0.0, 1.0, 1e-8]])
    exact = p.float() * hp[0, velvet.HP_DECAY]
    expected = exact.bfloat16()
    truncated = exact.view(torch.int32).bitwise_and(-65536).view(torch.float32).bfloat16()
    assert (expected != truncated).sum() > n // 4, "test needs values where truncation differs"
    velvet.velvet_step(p, g, m, v, torch.zeros(4, dtype=torch.int32), hp, block=BLOCK)
    assert torch.equal(p, expected)


def test_rejects_mismatched_buffers():
    p, g, m, v, block_seg, hp = velvet.random_problem([100], torch.float32, block=BLOCK)
    with pytest.raises(ValueError, match="moments must be float32"):
        velvet.velvet_step(p, g, m.double(), v, block_seg, hp, block=BLOCK)
    with pytest.raises(ValueError, match="fewer blocks"):
        velvet.velvet_step(p, g, m, v, block_seg[:1], hp, block=BLOCK)
    with pytest.raises(ValueError, match="int32"):
        velvet.velvet_step(p, g, m, v, block_seg.long(), hp, block=BLOCK)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernel_compiles_for_hopper_with_128_bit_loads_and_stores(dtype):
    # No GPU needed: Triton lowers the kernel to PTX for sm_90 (H100/H200) here. Every
    # buffer access must be a 16-byte vector (ld/st.global.v4), which is what lets one
    # launch run at copy bandwidth; only the 9 per-program table reads are scalar.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = "*fp32" if dtype == "fp32" else "*bf16"
    signature = {"p_ptr": ptr, "g_ptr": ptr, "m_ptr": "*fp32", "v_ptr": "*fp32",
                 "blocks_ptr": "*i32", "block_seg_ptr": "*i32", "hp_ptr": "*fp32",
                 "n_elements": "i32", "sparse_threshold": "fp32", "NUM_HP": "constexpr",
                 "SPARSE": "constexpr", "MASKED": "constexpr", "BLOCK": "constexpr"}
    constexprs = {"NUM_HP": velvet.NUM_HP, "SPARSE": False, "MASKED": False,
                  "BLOCK": velvet.BLOCK}
    # What the launcher infers for torch allocations: 16-byte aligned pointers.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
    # A compiled-kernel JITFunction, whatever TRITON_INTERPRET made of the decorator.
    kernel = triton.runtime.jit.JITFunction(velvet._velvet_kernel.fn)
    src = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": velvet.NUM_WARPS,
                                       "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    loads = re.findall(r"ld\.global(?:\.\w+)*", ptx)
    stores = re.findall(r"st\.global(?:\.\w+)*", ptx)
    elems = velvet.BLOCK // (32 * velvet.NUM_WARPS)  # per thread per buffer
    vec_p = elems * (4 if dtype == "fp32" else 2) // 16  # 16-byte vectors for p (and g)
    vec_m = elems * 4 // 16
    assert sum(".v4" in x for x in loads) == 2 * vec_p + 2 * vec_m
    assert sum(".v4" not in x for x in loads) == 2 + velvet.NUM_HP
    assert all(".v4" in x for x in stores) and len(stores) == vec_p + 2 * vec_m
