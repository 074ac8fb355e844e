"""The CPU convolution's own GEMM and its instruction-set paths (csrc/cpu/gemm*.{h,cpp}).

Each path (AVX-512, AVX2+FMA, portable C++) is forced in turn with set_cpu_isa, so that a machine runs
the paths it would not choose by itself too; a path the CPU cannot run is skipped. The shapes are
drawn to land on the micro-kernels' edge tiles (M, N, K not multiples of the register block, K = 1),
on more than one cache block (K > 256, N > 2400), and on every route of the convolution: im2col, the
shifted planes, the NHWC kernel, and d_x as the transposed convolution.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_cs231n.functional as ours

from helpers import assert_same_layout, forced_isa

ops = torch.ops.torch_cs231n
ISAS = ["avx512", "avx2", "baseline"]



def test_set_cpu_isa_restores_and_refuses_unknown_names():
    detected = ops.cpu_isa()
    previous = ops.set_cpu_isa("baseline")
    try:
        assert ops.cpu_isa() == "baseline"
        assert ops.set_cpu_isa("avx2") == "baseline"
    finally:
        ops.set_cpu_isa(previous)
    assert ops.cpu_isa() == detected
    with pytest.raises(RuntimeError, match="expected isa to be one of 'amx', 'avx512', 'avx2', 'baseline' or 'auto', but got 'sse9'"):
        ops.set_cpu_isa("sse9")


def _view(t, transposed):
    """The same matrix, row-major or held transposed in memory."""
    return t.t().contiguous().t() if transposed else t


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=25)
@given(m=st.integers(1, 70), n=st.integers(1, 130), k=st.integers(1, 300), ta=st.booleans(), tb=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_gemm_matches_float64(isa, m, n, k, ta, tb, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    with forced_isa(isa):
        c = ops.gemm(_view(a, ta), _view(b, tb))
    torch.testing.assert_close(c, (a.double() @ b.double()).float(), rtol=1e-4, atol=1e-5 * k ** 0.5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (9, 2500, 3), (17, 49, 600), (300, 5, 7)])
def test_gemm_blocks_and_edges(isa, m, n, k):
    """One row / column / k; more than one NC block of columns (2400) and KC block of k (256)."""
    gen = torch.Generator().manual_seed(m * n * k)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    with forced_isa(isa):
        c = ops.gemm(a, b)
    torch.testing.assert_close(c, (a.double() @ b.double()).float(), rtol=1e-4, atol=1e-5 * k ** 0.5)


def test_gemm_float64_is_exact_to_rounding():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 300, dtype=torch.float64, generator=gen), torch.randn(300, 53, dtype=torch.float64,
                                                                                  generator=gen)
    torch.testing.assert_close(ops.gemm(a, b), a @ b, rtol=1e-12, atol=1e-12)


def test_gemm_refuses_bad_arguments():
    with pytest.raises(RuntimeError, match=r"gemm: expected a.size\(1\) == b.size\(0\), but got a of shape \[2, 3\]"):
        ops.gemm(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(RuntimeError, match="gemm: expected a and b to be both float32 or both float64, but got Float and Int"):
        ops.gemm(torch.zeros(2, 3), torch.zeros(3, 5, dtype=torch.int32))


# ------------------------------------------------------------------------------ the convolution's routes
@st.composite
def conv_routes(draw):
    """Channel counts on both sides of 16 (the NHWC and transposed-convolution routes need 16 per group),
    rows short and long (the shifted planes need oW >= 0.9 Wp), strides 1 and 2."""
    groups = draw(st.sampled_from([1, 1, 2]))
    cg = draw(st.sampled_from([1, 3, 16, 20]))
    fg = draw(st.sampled_from([1, 5, 8, 17]))
    k = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([1, 1, 2]))
    padding = draw(st.integers(0, k // 2))
    h = draw(st.integers(max(1, k - 2 * padding), 12))
    w = draw(st.integers(max(1, k - 2 * padding), 40))
    n = draw(st.integers(1, 3))
    return dict(shape=(n, cg * groups, h, w), f=fg * groups, k=k, stride=stride, padding=padding, groups=groups)


# The weight's layouts: the kernels read the filters through its strides (cpu/conv2d_pixels.h,
# filter_segments), so each layout is a different packing (cpu/gemm.cpp, segments_packing): NCHW (taps
# contiguous), channels_last (channels contiguous), filters innermost (a permuted view), and a view whose
# taps are not evenly spaced (copied first).
WEIGHT_LAYOUTS = ["nchw", "channels_last", "filters_inner", "uneven_taps"]


def _weight(shape, layout, gen):
    f, c, kh, kw = shape
    if layout == "channels_last":
        return torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    if layout == "filters_inner":
        return torch.randn(kh, kw, c, f, generator=gen).permute(3, 2, 0, 1)
    if layout == "uneven_taps":
        return torch.randn(f, c, 2 * kh, 2 * kw, generator=gen)[:, :, ::2, ::2]
    return torch.randn(shape, generator=gen)


def _conv_against_float64(case, channels_last, seed, weight_layout="nchw"):
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(case["shape"], generator=gen).contiguous(memory_format=fmt)
    w = _weight((case["f"], case["shape"][1] // case["groups"], case["k"], case["k"]), weight_layout, gen)
    b = torch.randn(case["f"], generator=gen)
    kwargs = dict(stride=case["stride"], padding=case["padding"], groups=case["groups"],
                  dilation=case.get("dilation", 1))
    leaves = [x.clone().requires_grad_(), w.detach().requires_grad_(), b.clone().requires_grad_()]
    y = ours.conv2d(*leaves, **kwargs)
    dy = torch.randn(y.shape, generator=gen).contiguous(memory_format=fmt)
    grads = torch.autograd.grad(y, leaves, dy)
    # torch's float64 convolution (slow_conv2d) refuses the odd weight layouts ("grad_weight must be
    # contiguous"): its reference takes them contiguous, and the layouts are held to torch's only for the
    # two that torch itself runs in both dtypes
    odd = weight_layout not in ("nchw", "channels_last")
    ref_leaves = [t.requires_grad_() for t in (x.double(), w.double().contiguous() if odd else w.double(), b.double())]
    y_ref = F.conv2d(*ref_leaves, **kwargs)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    depth = w[0].numel()  # products summed into one output
    for got, want in zip((y, *grads), (y_ref, *ref_grads)):
        if not odd:
            assert_same_layout(got, want)
        scale = max(depth, y.shape[0] * y.shape[2] * y.shape[3]) ** 0.5
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=20)
@given(case=conv_routes(), channels_last=st.booleans(), weight_layout=st.sampled_from(WEIGHT_LAYOUTS),
       seed=st.integers(0, 2**31 - 1))
def test_conv2d_routes_match_float64(isa, case, channels_last, weight_layout, seed):
    with forced_isa(isa):
        _conv_against_float64(case, channels_last, seed, weight_layout)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", [
    dict(shape=(1, 1, 1, 1), f=1, k=1, stride=1, padding=0, groups=1),        # K = 1, one pixel
    dict(shape=(2, 300, 3, 3), f=20, k=1, stride=1, padding=0, groups=1),     # k above one KC block
    dict(shape=(1, 2, 2, 2600), f=9, k=3, stride=1, padding=1, groups=1),     # a row above one NC block
    dict(shape=(2, 32, 9, 9), f=40, k=3, stride=1, padding=1, groups=2),      # NHWC-route sizes, groups
    dict(shape=(2, 6, 20, 37), f=6, k=3, stride=1, padding=1, groups=6),      # depthwise 3x3, large plane
    dict(shape=(3, 40, 5, 6), f=40, k=3, stride=2, padding=1, groups=40),     # depthwise, small plane
    # short rows and many channels: NCHW through the NHWC kernel (transposed in cache), or NHWC itself
    dict(shape=(2, 32, 14, 14), f=24, k=3, stride=1, padding=1, groups=1),
    # strided layers large enough for the shifted planes' phases: stem-like, stride 3, dilated
    dict(shape=(2, 3, 30, 41), f=10, k=7, stride=2, padding=3, groups=1),
    dict(shape=(1, 4, 40, 45), f=9, k=5, stride=3, padding=2, groups=1),
    dict(shape=(2, 5, 33, 36), f=8, k=3, stride=2, padding=2, groups=1, dilation=2),
    # more strided layers, which channels_last runs in NHWC with d_x by the stride's phases: a 1x1 kernel
    # (phases without taps), groups, other strides along each axis, and a small image (pixel rows)
    dict(shape=(2, 20, 33, 31), f=17, k=1, stride=2, padding=0, groups=1),
    dict(shape=(2, 32, 30, 30), f=16, k=3, stride=2, padding=1, groups=2),
    dict(shape=(2, 16, 28, 37), f=12, k=3, stride=(2, 3), padding=1, groups=1),
    dict(shape=(3, 16, 9, 11), f=20, k=3, stride=2, padding=1, groups=1),
    # depthwise with channels as vectors (channels_last: every size, channels innermost): 2 whole vectors
    # and a tail of 8, 3x3 (d_W's nine sums in registers) and 5x5, d_x by the flipped filters
    dict(shape=(2, 40, 9, 11), f=40, k=3, stride=1, padding=1, groups=40),
    dict(shape=(2, 20, 8, 9), f=20, k=5, stride=1, padding=2, groups=20),
    # ... and rows long enough for blocks of 8 outputs read in place between blocks that meet the padding
    # (channels_last reads x where it lies), strided and dilated too
    dict(shape=(2, 32, 5, 40), f=32, k=3, stride=1, padding=1, groups=32),
    dict(shape=(2, 48, 9, 61), f=48, k=5, stride=2, padding=3, groups=48, dilation=2),
    # channels_last's forward in blocks of 8, 4 and 1 between the border outputs (5 inside: a block of 4 and
    # one overlapping it); d_W read in place from rows of 16 outputs (21 inside: blocks of 8, 8, 4 and 1),
    # 2 vectors and a tail of 8 channels; padding 3 leaves output rows that no tap reaches
    dict(shape=(2, 32, 6, 7), f=32, k=3, stride=1, padding=1, groups=32),
    dict(shape=(2, 40, 5, 23), f=40, k=3, stride=1, padding=1, groups=40),
    dict(shape=(2, 16, 2, 18), f=16, k=3, stride=1, padding=3, groups=16),
    # 1x1 layers, which channels_last runs as products over the whole batch's pixels (conv2d_pointwise.h):
    # an expansion (fewer channels than filters: d_W as Xᵀ · dY, transposed; under 32 channels the
    # forward as a plain GEMM), projections whose filters make narrow tiles (16: 24 x 16, 24: 12 x 32;
    # rows not a whole number of tiles), 100 filters (a sliver of 64 and one of 36 in 8 x 48), and one
    # large enough that d_W sums a chunk of rows per thread
    dict(shape=(2, 16, 12, 13), f=40, k=1, stride=1, padding=0, groups=1),
    dict(shape=(2, 48, 7, 9), f=16, k=1, stride=1, padding=0, groups=1),
    dict(shape=(3, 40, 5, 7), f=24, k=1, stride=1, padding=0, groups=1),
    dict(shape=(2, 36, 5, 7), f=100, k=1, stride=1, padding=0, groups=1),
    dict(shape=(3, 40, 10, 11), f=24, k=1, stride=1, padding=0, groups=1),
    # 8960 pixels: more than one block of gemm_segments' row table (d_x) and of d_W's pixel table a chunk
    dict(shape=(2, 24, 64, 70), f=16, k=1, stride=1, padding=0, groups=1),
    # few pixels and C·F of 2^18 or more: d_W one packed product over all the pixels (F not a whole tile)
    dict(shape=(2, 512, 3, 5), f=520, k=1, stride=1, padding=0, groups=1),
    # few channels, which channels_last runs by the windows' rows of taps (conv2d_windows.h; stem_like above
    # too; d_W by window rows): blocks that end mid-row, windows cut by the padding or lying wholly in it,
    # and a dilation along the height (the rows' segments apart) with strides of each size
    dict(shape=(3, 4, 33, 37), f=20, k=3, stride=1, padding=1, groups=1),
    dict(shape=(2, 3, 4, 5), f=6, k=2, stride=2, padding=3, groups=1),
    dict(shape=(2, 3, 17, 19), f=8, k=3, stride=(2, 1), padding=(2, 1), groups=1, dilation=(2, 1)),
    # strided NCHW stems by the windows too (nchw_by_windows, AVX-512): 575 outputs a sample in blocks of
    # 216 (70 filters: two slivers), 3 samples over the threads, so that a thread moves on to the next
    # sample mid-way; then anisotropic strides
    dict(shape=(3, 3, 45, 50), f=70, k=7, stride=2, padding=3, groups=1),
    dict(shape=(2, 5, 40, 41), f=16, k=5, stride=(2, 3), padding=(2, 1), groups=1),
    # d_W in NHWC with neither operand packed (cpu::gemm_gather_a): 323 outputs make two blocks of k,
    # 70 filters a sliver of 64 and one of 6 (24 x 16 tiles)
    dict(shape=(2, 16, 19, 17), f=70, k=3, stride=1, padding=1, groups=1),
    # a small image (pixel rows: 90 outputs a sample) read from the block's padded planes, d_W gathered
    dict(shape=(3, 16, 9, 10), f=40, k=3, stride=1, padding=1, groups=1),
    # strided, 81 outputs: d_W gathered from the block's planes split into phases; d_x by phases, a block
    # of samples a product
    dict(shape=(3, 16, 17, 18), f=20, k=3, stride=2, padding=1, groups=1),
    # ... and 128 filters: dY's rows (transposed from NCHW, copied from NHWC) a cache line past 512 bytes
    # apart (dy_rows_pitch)
    dict(shape=(3, 16, 17, 18), f=128, k=3, stride=2, padding=1, groups=1),
    # a 1 x 1 layer of 72 outputs a sample: d_W as a packed product of its pixel rows
    dict(shape=(3, 24, 8, 9), f=20, k=1, stride=1, padding=0, groups=1),
    # one input row, which no even tap reaches: d_x's first phase is (1, 0), of fewer taps than (0, 0)
    dict(shape=(2, 16, 1, 2), f=20, k=3, stride=2, padding=1, groups=1),
    # 40 outputs, dilated along the height only: NCHW d_W's pixel rows in W's (c, t) order, each output's
    # taps through their offsets in the plane
    dict(shape=(2, 16, 5, 6), f=20, k=3, stride=1, padding=2, groups=1, dilation=(2, 1)),
    # at most 128 outputs in the batch (AVX-512: the forward by dot products, conv2d_dots.h): 49 outputs (a
    # last block of 1 pixel), 36 filters (a last block of 4); k = 576 (two chunks, the second of 64),
    # strided and dilated; a 1x1 layer; 20 outputs of a padding that some taps never leave
    dict(shape=(1, 32, 7, 7), f=36, k=3, stride=1, padding=1, groups=1),
    dict(shape=(2, 64, 4, 5), f=20, k=3, stride=2, padding=1, groups=1, dilation=2),
    dict(shape=(3, 48, 4, 4), f=24, k=1, stride=1, padding=0, groups=1),
    dict(shape=(1, 16, 2, 3), f=8, k=3, stride=1, padding=2, groups=1),
    # small images of grouped layers (ResNeXt's last stages): pixel rows a group a product, d_W gathered
    # under 64 outputs; 2 groups of 32 on 7 x 7 (d_x by the transposed convolution), 3 groups of 16 channels
    # and 24 filters strided on 5 x 5 outputs (the planes padded into phases even for NCHW; d_x by phases)
    dict(shape=(3, 64, 7, 7), f=64, k=3, stride=1, padding=1, groups=2),
    dict(shape=(3, 48, 9, 10), f=72, k=3, stride=2, padding=1, groups=3),
    # groups of 2 to 16 channels and as many filters (ResNeXt's): whole groups side by side in a vector's
    # lanes (conv2d_grouped.h; both layouts, the forward, d_x and d_W). Groups of 4 over two vectors of
    # channels, 11 outputs a row (115 places of the pitch: blocks of 24, the last overlapping the one
    # before); groups of 8, strided (d_x by the stride's phases, from one plane of dY); groups of 2 (a
    # broadcast of 8 lanes) dilated with padding 2; strides (4, 2) with a 2 x 2 kernel: phases with no tap,
    # whose d_x is zero; groups of 16 (a broadcast of one lane) on 8 x 8 (78 places: blocks of 16) and
    # strided; one output row of 3 (blocks of 1)
    dict(shape=(2, 32, 9, 11), f=32, k=3, stride=1, padding=1, groups=8),
    dict(shape=(2, 32, 13, 12), f=32, k=3, stride=2, padding=1, groups=4),
    dict(shape=(3, 16, 10, 12), f=16, k=3, stride=1, padding=2, groups=8, dilation=2),
    dict(shape=(2, 16, 6, 7), f=16, k=2, stride=(4, 2), padding=0, groups=4),
    dict(shape=(3, 32, 8, 8), f=32, k=3, stride=1, padding=1, groups=2),
    dict(shape=(3, 32, 15, 13), f=32, k=3, stride=2, padding=1, groups=2),
    dict(shape=(2, 16, 1, 3), f=16, k=3, stride=1, padding=1, groups=4),
    # one sample (batch-1 inference): a single chunk, run outside any parallel region so that its products
    # split among the threads themselves (conv2d_blocks.h's for_chunks); 3x3 stride 1 and 2, and a stem
    dict(shape=(1, 32, 16, 18), f=48, k=3, stride=1, padding=1, groups=1),
    dict(shape=(1, 32, 21, 20), f=70, k=3, stride=2, padding=1, groups=1),
    dict(shape=(1, 3, 45, 50), f=70, k=7, stride=2, padding=3, groups=1),
    # ... and grouped (16 channels a group, 168 and 156 outputs): 16 filters a group in a vector's lanes, the
    # sample's two vectors a thread each (conv2d_grouped.h's VectorSlices); 12 filters a group by the groups'
    # products among the threads (for_each_group); the forward, d_W and d_x by the transposed convolution or
    # by phases
    dict(shape=(1, 32, 12, 14), f=32, k=3, stride=1, padding=1, groups=2),
    dict(shape=(1, 48, 24, 26), f=36, k=3, stride=2, padding=1, groups=3),
    # ... and in groups of 4 and 8 channels (in lanes, conv2d_grouped.h): the sample's vectors in slices, a
    # slice a thread (VectorSlices), for the forward, d_W and d_x (by the transposed convolution; strided,
    # by phases)
    dict(shape=(1, 32, 9, 11), f=32, k=3, stride=1, padding=1, groups=8),
    dict(shape=(1, 32, 13, 12), f=32, k=3, stride=2, padding=1, groups=4),
    # NCHW 1x1 layers by shifted planes read x and write y in place (no padding, a pitch of oW): at batch 1
    # on 14 x 14 (5 column tiles, the last of 4 columns) the product splits its 72 rows among the threads;
    # padded, x is copied but y still written in place
    dict(shape=(1, 64, 14, 14), f=72, k=1, stride=1, padding=0, groups=1),
    dict(shape=(2, 20, 9, 30), f=24, k=1, stride=1, padding=1, groups=1),
    # depthwise at batch 1: channels_last's forward and d_W in bands of output rows among the threads;
    # small NCHW planes in slices of whole 16-channel vectors, a slice a thread (depthwise_by_channel_slices):
    # 100 channels as 48 + 52 (the last 4 past the vectors), at stride 1 and 2
    dict(shape=(1, 32, 9, 40), f=32, k=3, stride=1, padding=1, groups=32),
    dict(shape=(1, 100, 13, 13), f=100, k=3, stride=1, padding=1, groups=100),
    dict(shape=(1, 100, 25, 26), f=100, k=3, stride=2, padding=1, groups=100),
    # NCHW strided depthwise up to 32 x 32 outputs by channels innermost (420 outputs), d_x gathered; a 9 x 9
    # filter (more taps than kMaxDepthwiseTaps: the scalar loops, and a gather of up to 81 pairs a pixel)
    dict(shape=(2, 20, 40, 42), f=20, k=3, stride=2, padding=1, groups=20),
    dict(shape=(2, 20, 12, 12), f=20, k=9, stride=1, padding=4, groups=20),
    # d_W of one sample in NHWC: the gathered product's 576 rows split among the threads in 24-row units,
    # d_Wᵀ (576 x 136) transposed in bands among them, and NCHW's order 16 filters at a time (the last 8)
    dict(shape=(1, 64, 12, 12), f=136, k=3, stride=1, padding=1, groups=1),
    # NCHW d_x of a grouped 1x1 layer by its transposed convolution: W_t by 16 x 16 block transposes
    # (20 filters a group: a block of 16 and one of 4)
    dict(shape=(1, 48, 14, 15), f=40, k=1, stride=1, padding=0, groups=2),
    # strided layers of at most 256 outputs (AVX-512): d_x as d_colᵀ = dYᵀ·W with W's rows read in place,
    # then col2im; 3x3 over 2 samples, and 1x1 strides (2, 3) whose d_x is zero where no output reads
    dict(shape=(2, 40, 9, 8), f=36, k=3, stride=2, padding=1, groups=1),
    dict(shape=(1, 24, 10, 13), f=20, k=1, stride=(2, 3), padding=0, groups=1),
    # Winograd's F(2x2, 3x3) (conv2d_winograd.h; float32 3x3 stride 1 on AVX-512, channels and filters in
    # whole vectors; the forward and d_x 64 or more, d_W 32 and 96 tiles in the batch): odd output sizes
    # (the last tiles' outputs partly outside), 80 filters (a sliver of 64 and one with zero columns),
    # paddings 0 and 2 (d_x's transposed convolution pads 2 and 0); one sample whose tiles go among the
    # threads in blocks; 61 x 30 outputs in bands of 8 tile rows (the last of 7, its last row half outside);
    # d_W of 450 tiles in a range a thread (the second sample split between them, mid-row), and of 140
    # small-image tiles (7 samples of 20) in blocks that span samples, each thread its own ξ; and 5 small
    # images of 128 channels and 144 filters (U past 1 MiB: blocks of up to 96 tiles) in a group of 2
    # samples and one of 3 (with 2 threads), a group's tiles (12 a sample) one block; one sample of those
    # channels (156 outputs: past the dot products) by slivers of filters among the threads (64, 64 and 16
    # filters; d_x: 64, 64)
    dict(shape=(2, 64, 13, 15), f=80, k=3, stride=1, padding=1, groups=1),
    dict(shape=(2, 64, 9, 10), f=64, k=3, stride=1, padding=0, groups=1),
    dict(shape=(1, 64, 7, 9), f=64, k=3, stride=1, padding=2, groups=1),
    dict(shape=(1, 64, 20, 22), f=64, k=3, stride=1, padding=1, groups=1),
    dict(shape=(2, 64, 61, 30), f=64, k=3, stride=1, padding=1, groups=1),
    dict(shape=(3, 32, 30, 20), f=32, k=3, stride=1, padding=1, groups=1),
    dict(shape=(7, 32, 8, 9), f=48, k=3, stride=1, padding=1, groups=1),
    dict(shape=(5, 128, 5, 7), f=144, k=3, stride=1, padding=1, groups=1),
    dict(shape=(1, 128, 12, 13), f=144, k=3, stride=1, padding=1, groups=1),
], ids=["k1", "deep_k", "long_row", "groups", "depthwise_3x3", "depthwise_small", "short_rows", "stem_like",
        "stride3", "dilated_strided", "pointwise_strided", "grouped_strided", "anisotropic_stride",
        "small_strided", "depthwise_vectors", "depthwise_5x5", "depthwise_rows", "depthwise_rows_strided", "depthwise_block4",
        "depthwise_dw_blocks", "depthwise_rows_outside", "pointwise_expansion", "pointwise_16",
        "pointwise_24", "pointwise_100", "pointwise_chunks", "pointwise_blocks", "pointwise_few_pixels", "windows_blocks", "windows_in_padding",
        "windows_dilated", "windows_nchw_blocks", "windows_nchw_anisotropic", "gathered_dw", "padded_block",
        "padded_block_strided", "padded_block_pitch", "pixel_rows_1x1", "first_phase_odd", "pixel_rows_dilated", "dots", "dots_chunks", "dots_1x1",
        "dots_padding", "grouped_pixel_rows", "grouped_pixel_rows_strided", "lanes_groups_4",
        "lanes_groups_8_strided", "lanes_groups_2_dilated", "lanes_groups_phases_without_taps", "lanes_groups_16",
        "lanes_groups_16_strided", "lanes_one_row",
        "one_sample", "one_sample_strided", "one_sample_stem", "one_sample_groups", "one_sample_groups_strided",
        "one_sample_lanes", "one_sample_lanes_strided", "one_sample_1x1", "pointwise_padded",
        "one_sample_depthwise", "one_sample_depthwise_slices", "one_sample_depthwise_slices_strided", "depthwise_strided_pixels", "depthwise_9x9",
        "one_sample_dw_split", "pointwise_dx_groups", "few_pixels_dx_strided",
        "few_pixels_dx_1x1", "winograd_odd", "winograd_padding_0", "winograd_padding_2", "winograd_one_sample",
        "winograd_bands", "winograd_dw_ranges", "winograd_dw_small_images", "winograd_sample_groups", "winograd_slivers"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS)
def test_conv2d_blocks_and_edges(isa, case, channels_last, weight_layout):
    with forced_isa(isa):
        _conv_against_float64(case, channels_last, seed=1, weight_layout=weight_layout)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, f", [((2, 64, 14, 14), 64), ((2, 128, 15, 13), 96)])
def test_winograd_is_as_close_to_float64_as_the_direct_route(monkeypatch, shape, f, channels_last):
    """Winograd's transforms only add, subtract and halve: its outputs and gradients stay within 1e-5 of the
    largest (as the CUDA route's test asks), and TORCH_CS231N_CPU_CONV=direct gives the same layer to the
    direct kernels, whose results differ from Winograd's in rounding only."""
    if ops.cpu_isa() not in ("avx512", "amx"):
        pytest.skip("Winograd's route needs AVX-512")
    gen = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(f, shape[1], 3, 3, generator=gen, dtype=torch.float64) / (9 * shape[1]) ** 0.5
    b = torch.randn(f, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape[0], f, shape[2], shape[3], generator=gen, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    want = (F.conv2d(*leaves, padding=1), *torch.autograd.grad(F.conv2d(*leaves, padding=1), leaves, dy))

    def run():
        ls = [t.detach().float().requires_grad_() for t in (x, w, b)]
        y = ours.conv2d(*ls, padding=1)
        return (y, *torch.autograd.grad(y, ls, dy.float()))

    by_winograd = run()
    monkeypatch.setenv("TORCH_CS231N_CPU_CONV", "direct")
    direct = run()
    for got, other, ref in zip(by_winograd, direct, want):
        largest = ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= 1e-5 * largest
        assert (other.double() - ref).abs().max().item() <= 1e-5 * largest
    # the routes differ: y, d_x and d_W went by other sums (d_b is the same sum of dY either way)
    assert not any(torch.equal(a, b) for a, b in zip(by_winograd[:3], direct[:3]))
    monkeypatch.setenv("TORCH_CS231N_CPU_CONV", "fast")
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CPU_CONV: expected 'winograd' or 'direct'.*got 'fast'"):
        run()


@pytest.mark.parametrize("channels_last", [False, True])
def test_winograd_slivers_shared_by_more_threads_than_slivers(channels_last):
    """One sample by Winograd's slivers with six threads and three slivers: each sliver's tiles in two
    ranges, each range's thread transforming the sliver's filters itself."""
    if ops.cpu_isa() not in ("avx512", "amx"):
        pytest.skip("Winograd's route needs AVX-512")
    threads = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        _conv_against_float64(dict(shape=(1, 128, 12, 13), f=144, k=3, stride=1, padding=1, groups=1),
                              channels_last, seed=2)
    finally:
        torch.set_num_threads(threads)


def test_an_unknown_isa_in_the_environment_is_ignored_with_a_warning():
    """TORCH_CS231N_CPU_ISA=avx-512 (a typo) must not pass silently: the kernels keep what the CPU has."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_CS231N_CPU_ISA="avx-512")
    probe = "import torch, torch_cs231n; print(torch.ops.torch_cs231n.cpu_isa())"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_CS231N_CPU_ISA='avx-512' is not one of amx, avx512, avx2, baseline or auto; ignored" in proc.stderr
    assert proc.stdout.strip() == ops.cpu_isa()


# ------------------------------------------------------------------------------ the bfloat16 route
def has_avx512_bf16():
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in f.read()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c,f,k,stride,padding,dilation,bias", [
    (64, 64, 3, 1, 1, 1, True),      # a ResNet layer: whole slivers of 64 filters, whole channel pairs
    (3, 70, 3, 1, 1, 1, False),      # an odd channel (its pair's other half is zero), a second, partial sliver
    (17, 5, 5, 1, 2, 2, True),       # dilation: the taps' offsets
    (16, 130, 1, 1, 0, 1, False),    # 1x1, three slivers
    (9, 7, (3, 1), 1, (1, 0), 1, True),  # a kernel of another height than width
    (64, 70, 3, 2, 1, 1, True),      # ResNet's downsampling 3x3: the stride's four phases
    (3, 64, 7, 2, 3, 1, False),      # the stem: 7x7 stride 2 on 3 channels
    (32, 20, 1, 2, 0, 1, True),      # the 1x1 stride-2 shortcut: one phase of four read
    (6, 9, 3, (2, 3), 1, 2, False),  # different strides along each axis, with dilation
    (40, 24, 2, (3, 2), 0, 1, False),  # d_x by phases: a phase without taps, rows and a column no window reaches
    (36, 40, 5, 3, 2, 1, True),      # d_x by phases: padding, phases of 2 and 1 taps
])
@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2"])
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_bfloat16_convolution_against_float64(layout, c, f, k, stride, padding, dilation, bias, isa, weight_layout):
    """bfloat16 in, float32 sums, one rounding out: within one bfloat16 ulp (2^-8 relative) of the float64
    result on the same bfloat16 operands, plus float32's error on the sum (cancelling terms). amx takes the
    AMX tiles where the CPU has them (conv2d_amx.h); avx512 the AVX512-BF16 route (conv2d_bf16.h); avx2
    the float32 kernels. The weight's layout chooses how the filters are packed: runs of taps (NCHW) or
    of channels (channels_last)."""
    if isa == "avx512" and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(c * 100 + f)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, c, 11, 13, generator=gen).bfloat16()
    w = (torch.randn(f, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5).bfloat16()
    b = torch.randn(f, generator=gen).bfloat16() if bias else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    check_bfloat16_convolution(x, w, b, dict(stride=stride, padding=padding, dilation=dilation), isa, gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("n,c,f,k,hw,stride", [
    (5, 48, 40, 3, (30, 27), 1),  # channels not a multiple of 32 (zero k), filters past a block, 5 samples
    (4, 96, 70, 3, (20, 21), 2),  # strided: the phases, each tap one shift of the pitch
    (3, 32, 33, 3, (70, 9), 1),   # a narrow image: blocks of 32 pixels straddle many rows of the pitch
    (3, 3, 40, 3, (45, 38), 2),   # a stem's few channels: d_W by taps (rows (t, c)), chunks of 512 pixels
    (2, 16, 48, 3, (33, 35), 1),  # 16 channels: 144 rows (t, c), the last block partly past them
    # 1x1 in NHWC: the rows x's own pixels, read in place; the batch's last block (585 = 18 * 32 + 9
    # pixels) from a copy, not past x's end
    (3, 64, 40, 1, (15, 13), 1),
])
def test_amx_bfloat16_convolution_of_larger_images_against_float64(layout, n, c, f, k, hw, stride):
    """The AMX tiles (conv2d_amx.h) on images larger than the test above's: blocks of 32 pixels whose
    thrown-away columns of the pitch are skipped when stored, the padded x read 32 pixels past its plane,
    and d_W summed over each sample's whole pitch (by taps for few channels)."""
    gen = torch.Generator().manual_seed(c + f)
    x = torch.randn(n, c, *hw, generator=gen).bfloat16()
    w = (torch.randn(f, c, k, k, generator=gen) / (c * k * k) ** 0.5).bfloat16()
    b = torch.randn(f, generator=gen).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_bfloat16_convolution(x, w, b, dict(stride=stride, padding=k // 2), "amx", gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("n,c,f,k,hw,stride,padding", [
    (13, 40, 36, 3, (8, 8), 1, 1),  # chunks of 6 and 7 samples: blocks of 6, then 3 and 4 planes
    (11, 64, 48, 1, (5, 7), 1, 0),  # 1x1: planes without padding, 5 and 6 samples a block
    (7, 48, 40, 3, (9, 10), 2, 1),  # strided: a sample's four phases one plane, blocks of 3 and 4
    # chunks of 22 samples in blocks of 5, 6, 5, 6, whose 1x1 sums run past a 5-block's 500 pixels to 512:
    # into the planes a 6-block left
    (44, 32, 40, 1, (10, 10), 1, 0),
    # few pixels against many filters: the filters among the threads in blocks of 32 (150: the last block
    # past F), every sample by each
    (4, 32, 150, 1, (4, 4), 1, 0),
    (3, 40, 100, 3, (4, 5), 1, 1),
])
def test_amx_bfloat16_weight_grad_of_small_images_against_float64(layout, n, c, f, k, hw, stride, padding):
    """d_W on the AMX tiles for images of under 128 outputs: blocks of samples whose padded planes lie one
    after another as one plane (conv2d_amx.h), a smaller block's tail cleared of the larger one's dY."""
    gen = torch.Generator().manual_seed(n + c + f)
    x = torch.randn(n, c, *hw, generator=gen).bfloat16()
    w = (torch.randn(f, c, k, k, generator=gen) / (c * k * k) ** 0.5).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_bfloat16_convolution(x, w, None, dict(stride=stride, padding=padding), "amx", gen)


@pytest.mark.parametrize("isa", ["amx", "avx512"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c,f,k,hw,stride,padding", [
    (48, 40, 3, (23, 27), 1, 1),  # a sample's output rows in bands among the threads (SampleBands)
    (40, 36, 3, (25, 30), 2, 1),  # ... strided
    (3, 40, 7, (90, 80), 2, 3),   # a stem by windows (1800 outputs): its blocks of outputs in bands
    (64, 40, 1, (15, 13), 1, 0),  # 1x1 read in place (AMX, NHWC), in bands: the last band's last rows copied
    (64, 160, 3, (7, 7), 1, 1),   # by rows (49 outputs): the filters' blocks among the threads, a last partial
    (96, 200, 1, (5, 6), 1, 0),   # ... a 1 x 1 layer
])
def test_bfloat16_forward_of_one_sample_against_float64(isa, layout, c, f, k, hw, stride, padding):
    """Batch-1 inference in bfloat16: one sample's forward shared among the threads (two here), by bands of
    its output rows (or of its blocks of outputs, for a stem), each band stored alone; small images, whose
    outputs go by rows, by the filters' blocks (AMX: 32, AVX512-BF16: 64), each thread storing its own."""
    if isa == "avx512" and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _one_sample_against_float64(isa, layout, c, f, k, hw, stride, padding)
    finally:
        torch.set_num_threads(threads)


def _one_sample_against_float64(isa, layout, c, f, k, hw, stride, padding):
    gen = torch.Generator().manual_seed(c + f)
    x = torch.randn(1, c, *hw, generator=gen).bfloat16()
    w = (torch.randn(f, c, k, k, generator=gen) / (c * k * k) ** 0.5).bfloat16()
    b = torch.randn(f, generator=gen).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_bfloat16_convolution(x, w, b, dict(stride=stride, padding=padding), isa, gen)


def check_bfloat16_convolution(x, w, b, args, isa, gen):
    """Our bfloat16 y, d_x, d_W (and d_b) with the CPU kernels capped at `isa` against float64 on the same
    bfloat16 operands: within one bfloat16 ulp, plus float32's error on the sum."""
    bias = b is not None
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    with forced_isa(isa):
        y = ours.conv2d(leaves[0], leaves[1], leaves[2] if bias else None, **args)
        dy = torch.randn(y.shape, generator=gen).bfloat16()
        grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y_ref = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, **args)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_same_layout(y, y_ref)
    for got, want in zip((y,) + grads, (y_ref,) + grads_ref):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-5 * scale + 1e-6)


@pytest.mark.parametrize("c,k,stride,padding,dilation,hw", [
    (32, 8, 1, 1, 1, (9, 11)),    # groups of 8 (2 a vector, pairs broadcast 8 bytes), two vectors
    (16, 2, 1, 2, 2, (10, 12)),   # groups of 2 (8 a vector: 32 bytes), dilated
    (32, 4, 2, 1, 1, (13, 12)),   # groups of 4, strided: d_x by the stride's phases
    (32, 16, 2, 1, 1, (15, 13)),  # groups of 16 (one pair broadcast), strided
    (16, 4, (4, 2), 0, 1, (6, 7)),  # a 2 x 2 kernel, strides (4, 2): phases with no tap
    (16, 8, 1, 1, 1, (1, 3)),     # one output row of 3 (blocks of 1)
])
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_bfloat16_grouped_in_lanes_against_float64(c, k, stride, padding, dilation, hw, isa, weight_layout):
    """Groups of 2 to 16 channels in bfloat16, channels_last: on AVX512-BF16 the lanes of conv2d_grouped.h
    by pairs of channels (conv2d_grouped_bf16.h: the forward and d_x, d_W in float32); avx2 the float32
    kernels. Within one bfloat16 ulp of float64 on the same operands."""
    if isa == "avx512" and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(c * 10 + k)
    kh = 2 if stride == (4, 2) else 3
    x = torch.randn(3, c, *hw, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, k, kh, kh, generator=gen) / (k * kh * kh) ** 0.5).bfloat16()
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(c, generator=gen).bfloat16()
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=c // k)
    check_bfloat16_convolution(x, w, b, args, isa, gen)


@pytest.mark.parametrize("c", [144, 56, 40, 16, 7])  # vectors of 32 and 16 channels, and the last few alone
@pytest.mark.parametrize("k,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), ((2, 5), (1, 2), (0, 2), (2, 1)), (7, 3, 3, 1),
])
@pytest.mark.parametrize("n,hw", [(3, (9, 21)), (1, (14, 14))])  # at batch 1 a sample's rows in bands
@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_depthwise_channels_last_is_the_float32_kernel_rounded(c, k, stride, padding, dilation, n, hw, isa):
    """The channels_last bfloat16 depthwise layer reads and writes bfloat16 (conv2d_depthwise.h, Bf16Pairs:
    even and odd channels as two float32 vectors, filters, bias, d_W and d_b reordered to match): the
    forward, d_x (stride 1: the forward on dY with the flipped filters; strided: the gather), d_W and d_b
    (in place from rows of 16 outputs, else from the padded sample). Each must give the bits of the float32 kernels on converted
    copies, rounded once: the same sums in the same order. Every instruction set (GCC's generic vectors);
    NaN and infinities among the forward's inputs (the backward's are finite, where NaN would fill d_W)."""
    gen = torch.Generator().manual_seed(c + n)
    x = torch.randn(n, c, *hw, generator=gen).bfloat16()
    x_odd = x.clone()
    x_odd.view(-1)[[5, 77, 300]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).bfloat16()
    x, x_odd = (t.contiguous(memory_format=torch.channels_last) for t in (x, x_odd))
    kh, kw = (k, k) if isinstance(k, int) else k
    w = (torch.randn(c, 1, kh, kw, generator=gen) / kh).bfloat16()
    b = torch.randn(c, generator=gen).bfloat16()
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=c)

    def same_bits(got, want):
        nan = want.isnan()
        assert got.dtype == torch.bfloat16 and (got.isnan() == nan).all()
        assert (got.view(torch.int16) == want.view(torch.int16))[~nan].all()

    with forced_isa(isa):
        for bias in (b, None):
            y = ours.conv2d(x_odd, w, bias, **args)
            want = ours.conv2d(x_odd.float(), w.float(), None if bias is None else bias.float(), **args).bfloat16()
            assert y.is_contiguous(memory_format=torch.channels_last) and want.isnan().any()
            same_bits(y, want)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = ours.conv2d(*leaves, **args)
        dy = torch.randn(y.shape, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
        grads = torch.autograd.grad(y, leaves, dy)
        leaves32 = [t.float().requires_grad_() for t in (x, w, b)]
        grads32 = torch.autograd.grad(ours.conv2d(*leaves32, **args), leaves32, dy.float())
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
        for got, want in zip(grads, grads32):
            same_bits(got, want.bfloat16())


@pytest.mark.parametrize("c", [48, 40])
@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_depthwise_outputs_are_rounded_as_torch_rounds(c, isa):
    """The rounding of that kernel, bit for bit against torch's of float64 sums: a 2 x 2 filter [[1, 0], [0,
    0]] makes each output x + b. Channels 0-15 (and the scalar tail past 32) have inputs in [-4, 4] and a
    bias of 1 (channel 0: 1.5): sums exact in float32, many of them ties, 254 + 1.5 one that rounds up to
    2^8. Channels 16-31 have inputs
    in [1, 1.5) * 2^-126 and a bias of -2^-126: denormal outputs, which the rounding keeps. A NaN and an
    infinity, which the filter's zeros make NaN in 4 + 3 outputs: c10::BFloat16's 0x7fc0 (torch's vectorised
    conversion keeps sign and payload, so their bits are not compared with its)."""
    gen = torch.Generator().manual_seed(c)
    x = torch.rand(2, c, 13, 17, generator=gen) * 8 - 4
    x[:, 16:32] = (1 + x[:, 16:32].abs() / 8) * 2.0**-126
    x = x.bfloat16()
    x[0, 3, 4, 5], x[1, 0, 0, 0], x[1, 1, 1, 1] = float("nan"), 254.0, float("inf")
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(c, 1, 2, 2).bfloat16()
    b = torch.ones(c)
    b[0], b[16:32] = 1.5, -(2.0**-126)
    b = b.bfloat16()
    with forced_isa(isa):
        y = ours.conv2d(x, w, b, groups=c)
    want = F.conv2d(x.double(), w.double(), b.double(), groups=c).float().bfloat16()
    nan = want.isnan()
    denormal = (want != 0) & (want.abs() < 2.0**-126)
    assert nan.sum() == 7 and (y.isnan() == nan).all() and (y.view(torch.int16)[nan] == 0x7FC0).all()
    assert denormal[:, 16:32].float().mean() > 0.9
    assert (want[1, 0, 0, 0] == 256) and (y.view(torch.int16) == want.view(torch.int16))[~nan].all()


@pytest.mark.parametrize("k,padding", [(1, 0), (3, 1)])
def test_bfloat16_weight_grad_sums_pixel_rows_in_blocks(k, padding):
    """d_W of small images on the bfloat16 route sums the output pixels of a block of samples at once, in
    pairs (conv2d_bf16.h, pixel rows). 11 x 11 outputs make blocks of 4 samples; 10 samples on 2 threads
    give each thread a block of 4 and then one of 1, and 121 rows a block an odd last row, whose partner
    must be zero, not the next sample's first row."""
    if not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(10, 64, 11, 11, generator=gen).bfloat16()
    w = (torch.randn(48, 64, k, k, generator=gen) / (64 * k * k) ** 0.5).bfloat16().requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with forced_isa("avx512"):
            y = ours.conv2d(x, w, padding=padding)
            dy = torch.randn(y.shape, generator=gen).bfloat16()
            (dw,) = torch.autograd.grad(y, w, dy)
    finally:
        torch.set_num_threads(threads)
    w64 = w.detach().double().requires_grad_()
    (dw_ref,) = torch.autograd.grad(F.conv2d(x.double(), w64, padding=padding), w64, dy.double())
    scale = dw_ref.abs().max().item()
    torch.testing.assert_close(dw.double(), dw_ref, rtol=2**-8, atol=1e-5 * scale + 1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c,f,k,stride,padding,dilation", [
    (3, 64, 7, 2, 3, 1),               # the stem: runs of 21 values (11 words), 7 tap rows
    (3, 70, 3, 1, 1, (2, 1)),          # dilation along the height (the width's must be 1), a second sliver
    (4, 20, (5, 7), (3, 2), (2, 1), 1),  # runs of 28 values, strides of their own along each axis
    (1, 9, 5, 1, 0, 1),                # one channel: runs of 5 values (3 words, the last half zero)
    (15, 33, (3, 2), 1, 1, (1, 1)),    # 15 channels: runs of 30 values
])
@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_bfloat16_forward_of_few_channels_by_windows(c, f, k, stride, padding, dilation, layout, isa):
    """Layers of under 16 channels take the forward by windows (conv2d_bf16.h, bf16_window_rows): an output's
    row is its window's tap rows, each a run of kW·C values of a padded NHWC copy, by AVX512-BF16 or AMX
    tiles. Against float64 on the same bfloat16 operands, to one rounding; with at least 128 outputs a
    sample (fewer go by pixel rows), up to 1558 (blocks of 768 rows rounded into y one after the other)."""
    if not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(c * 100 + f)
    kh, kw = (k, k) if isinstance(k, int) else k
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, c, 41, 38, generator=gen).bfloat16().contiguous(memory_format=fmt)
    w = (torch.randn(f, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5).bfloat16()
    b = torch.randn(f, generator=gen).bfloat16()
    args = dict(stride=stride, padding=padding, dilation=dilation)
    with forced_isa(isa):
        y = ours.conv2d(x, w, b, **args)
    assert y[0, 0].numel() >= 128
    y_ref = F.conv2d(x.double(), w.double(), b.double(), **args)
    assert y.dtype == torch.bfloat16
    assert_same_layout(y, y_ref)
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.double(), y_ref, rtol=2**-8, atol=1e-5 * scale + 1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_bfloat16_stem_with_an_infinity_spreads_it_only_to_its_windows(layout, isa):
    """On AMX the stem's tiles read x in place, 32 values a tap row where the run is 21: the rest, times
    zero weights, belongs to other windows. An infinity there would make NaN of outputs whose windows do
    not hold it, so a sample holding one has its rows built with zeros past the runs: its infinities and
    NaNs land where torch's do, and the other sample is read in place."""
    if not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 40, 36, generator=gen).bfloat16()
    x[1, 1, 17, 20] = float("inf")
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    w = (torch.randn(64, 3, 7, 7, generator=gen) / 147**0.5).bfloat16()
    with forced_isa(isa):
        y = ours.conv2d(x, w, None, stride=2, padding=3)
    y_ref = F.conv2d(x.double(), w.double(), None, stride=2, padding=3)
    assert y_ref[1].isinf().any() and y_ref[1].isfinite().float().mean() > 0.9
    assert (y.isfinite() == y_ref.isfinite()).all()
    finite = y_ref.isfinite()
    torch.testing.assert_close(y.double()[finite], y_ref[finite], rtol=2**-8, atol=1e-5 * y_ref[finite].abs().max())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_bfloat16_outputs_are_rounded_as_torch_rounds(isa, layout):
    """The float32 sums are rounded to bfloat16 as torch rounds (to nearest, ties to even), bit for bit: on
    avx512 by reduced_float.h's vector loop and its scalar tail, on AMX as each block is stored
    (amx_store_block). A 2 x 2 filter [[1, 0], [0, 0]] and a bias
    of 1 make each output x + 1, exact in float32 for x in [-4, 4] and rounded once: half of such sums are
    ties. NaN, infinities and a sum that rounds up to 2^8 are among the inputs; 41 x 38 outputs make
    blocks of 768 and 790 rows, the second not a whole number of 8-value vectors (the scalar tail). A
    NaN's bits are not compared: ours is c10::BFloat16's 0x7fc0, while torch's own vectorised conversion
    keeps the float's sign and payload (0xffff here)."""
    if not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(2, 1, 42, 39, generator=gen) * 8 - 4).bfloat16()
    x.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 254.0, 0.0]).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    w = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]).bfloat16()
    b = torch.ones(1).bfloat16()
    with forced_isa(isa):
        y = ours.conv2d(x, w, b)
    want = F.conv2d(x.double(), w.double(), b.double()).float().bfloat16()
    nan = want.isnan()
    assert nan.sum() == 2 and (y.isnan() == nan).all()
    assert (y.view(torch.int16) == want.view(torch.int16))[~nan].all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_bfloat16_outputs_of_many_channels_are_rounded_as_torch_rounds(isa, layout):
    """The same bit for bit on a 1 x 1 layer of 32 channels (the tiles' route on AMX, whose NHWC outputs
    are rounded 32 at a time by vcvtne2ps2bf16 as they are stored): an identity filter makes y[f] = x[f] +
    b[f]. Filters 0-15 have a bias of 1 (ties; a NaN among the inputs). Filters 16-31 have inputs in
    [1, 1.5) * 2^-126 and a bias of -2^-126, so that their outputs, added in float32 after the products,
    are denormals, which vcvtne2ps2bf16 would flush to zero and torch's rounding keeps. (The products
    themselves are normal: the tiles and vdpbf16ps flush denormal ones.)"""
    if not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(3, 32, 9, 16, generator=gen)  # 144 outputs a sample: the padded planes' route
    x[:, :16] = x[:, :16] * 8 - 4
    x[:, 16:] = (1 + x[:, 16:] / 2) * 2.0**-126
    x = x.bfloat16()
    x[1, 0, 2, 3] = float("nan")  # (into all 32 outputs of its pixel: 0 * NaN is NaN)
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    w = torch.eye(32).view(32, 32, 1, 1).bfloat16()
    b = torch.cat([torch.ones(16), torch.full((16,), -(2.0**-126))]).bfloat16()
    with forced_isa(isa):
        y = ours.conv2d(x, w, b)
    want = F.conv2d(x.double(), w.double(), b.double()).float().bfloat16()
    nan = want.isnan()
    denormal = (want != 0) & (want.abs() < 2.0**-126)
    assert nan.sum() == 32 and (y.isnan() == nan).all() and denormal[:, 16:].float().mean() > 0.9
    assert (y.view(torch.int16) == want.view(torch.int16))[~nan].all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c,f,k,padding,dilation", [
    (40, 8, 3, 1, 1),            # d_x is the forward by windows of dY (8 channels) with the flipped filters
    (32, 12, (3, 2), (2, 0), (2, 1)),  # dilation along the height, a flipped 3 x 2 through W's strides
])
def test_bfloat16_input_grad_of_few_filters_by_windows(c, f, k, padding, dilation, layout):
    """A stride-1 layer of many channels and under 16 filters: its d_x, the transposed convolution, has
    under 16 channels and takes the forward by windows on dY, the filters read transposed and flipped
    through W's strides (Bf16Filters::transposed_of). Against float64 on the same operands."""
    if not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(c + f)
    kh, kw = (k, k) if isinstance(k, int) else k
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, c, 20, 19, generator=gen).bfloat16().contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(f, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5).bfloat16()
    args = dict(padding=padding, dilation=dilation)
    with forced_isa("avx512"):
        y = ours.conv2d(x, w, **args)
        dy = torch.randn(y.shape, generator=gen).bfloat16().contiguous(memory_format=fmt)
        (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(F.conv2d(x64, w.double(), **args), x64, dy.double())
    assert dx.dtype == torch.bfloat16
    scale = dx_ref.abs().max().item()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=2**-8, atol=1e-5 * scale + 1e-6)


@pytest.mark.parametrize("c,f,k,stride,layout", [
    (3, 64, 7, 2, "contiguous"),      # the stem: 3 x 49 rows of (tap, channel), one sliver of filters
    (3, 64, 7, 2, "channels_last"),
    (20, 72, 3, 1, "contiguous"),     # 180 rows (30 tiles), a second, partial sliver of 8 filters
    (5, 33, 3, 2, "channels_last"),   # a last tile of 3 rows (45 = 7 x 6 + 3), 33 filters
    (3, 32, 3, 2, "channels_last"),   # MobileNetV2's stem
    (4, 40, 5, 3, "channels_last"),   # 3 column phases, the first pixel in phase 2 (padding 2)
])
@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_bfloat16_weight_grad_of_few_channels_by_taps(c, f, k, stride, layout, isa):
    """Layers of fewer than 32 channels take d_W's tiles along the filters, (tap, channel) as the rows
    (conv2d_bf16.h, bf16_weight_grad_by_taps; on AMX its channels_last x put into channel planes of the
    stride's phases straight from NHWC, pad_bf16_channel_planes): every row of a tile, and the filters past
    a whole sliver, against float64 on the same bfloat16 operands. Input that needs no gradient, as a
    stem's."""
    if not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(c * 100 + f)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(3, c, 40, 38, generator=gen).bfloat16().contiguous(memory_format=fmt)
    w = (torch.randn(f, c, k, k, generator=gen) / (c * k * k) ** 0.5).bfloat16().requires_grad_()
    with forced_isa(isa):
        y = ours.conv2d(x, w, stride=stride, padding=k // 2)
        dy = torch.randn(y.shape, generator=gen).bfloat16().contiguous(memory_format=fmt)
        (dw,) = torch.autograd.grad(y, w, dy)
    w64 = w.detach().double().requires_grad_()
    (dw_ref,) = torch.autograd.grad(F.conv2d(x.double(), w64, stride=stride, padding=k // 2), w64, dy.double())
    assert dw.dtype == torch.bfloat16
    assert_same_layout(dw, dw_ref)
    scale = dw_ref.abs().max().item()
    torch.testing.assert_close(dw.double(), dw_ref, rtol=2**-8, atol=1e-5 * scale + 1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("needs", ["bias", "weight", "input"])
@pytest.mark.parametrize("width", [9, 17])
def test_depthwise_gradients_asked_one_at_a_time(channels_last, needs, width):
    """Each gradient of a depthwise layer alone (a frozen weight with a trainable bias, say): the kernels
    skip what is not asked for, and must not read what they then did not prepare (channels_last: d_W's
    3x3 loop reads the padded input, which is built only when d_W is asked for; from 16 outputs a row,
    d_W and d_b read x in place, d_b alone with no d_W to add to)."""
    gen = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 32, 10, width, generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(32, 1, 3, 3, generator=gen)
    b = torch.randn(32, generator=gen)
    leaves = {"input": x, "weight": w, "bias": b}
    leaves[needs] = leaves[needs].clone().requires_grad_()
    y = ours.conv2d(leaves["input"], leaves["weight"], leaves["bias"], padding=1, groups=32)
    dy = torch.randn(y.shape, generator=gen)
    (got,) = torch.autograd.grad(y, leaves[needs], dy)
    ref = {k: v.double().detach() for k, v in leaves.items()}
    ref[needs].requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(ref["input"], ref["weight"], ref["bias"], padding=1, groups=32), ref[needs],
                                  dy.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
