"""SPEC section 9 test vectors and FlashInfer's own CPU helpers against the pipeline."""

from __future__ import annotations

import itertools

import pytest
import torch
from flashinfer.cute_dsl.utils import convert_sf_to_mma_layout
from flashinfer.fused_moe.core import get_reorder_rows_for_gated_act_gemm_row_indices
from flashinfer.utils import get_shuffle_matrix_a_row_indices

from nvfp4_prep.contract.mma_view import mma_view
from nvfp4_prep.pipeline import prepare, unprepare
from nvfp4_prep.pipeline.rowmaps import gated_pairing, interleave_64, swap_halves, trtllm_gemm1, trtllm_shuffle
from nvfp4_prep.pipeline.swizzle import tile_offsets, tiled_shape
from tests.helpers.layer_factory import random_layer, read_tags, tagged_layer


def test_p5_pairing_vector():
    assert gated_pairing(256)[:16].tolist() == [0, 128, 1, 129, 2, 130, 3, 131, 4, 132, 5, 133, 6, 134, 7, 135]


def test_p6_shuffle_vector():
    assert trtllm_shuffle(256)[:40].tolist() == [
        0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29, 2, 6, 10, 14, 18, 22, 26, 30,
        3, 7, 11, 15, 19, 23, 27, 31, 32, 36, 40, 44, 48, 52, 56, 60]


def test_p7_chained_vector():
    assert trtllm_gemm1(256, gated=True)[:24].tolist() == [
        0, 2, 4, 6, 8, 10, 12, 14, 128, 130, 132, 134, 136, 138, 140, 142, 1, 3, 5, 7, 9, 11, 13, 15]


@pytest.mark.parametrize("rows", [32, 128, 256, 4096, 7168])
def test_row_maps_match_flashinfer_helpers(rows):
    probe = torch.empty(rows, 1)
    assert torch.equal(trtllm_shuffle(rows), get_shuffle_matrix_a_row_indices(probe, epilogue_tile_m=128))
    assert torch.equal(gated_pairing(rows), get_reorder_rows_for_gated_act_gemm_row_indices(probe))
    chained = get_reorder_rows_for_gated_act_gemm_row_indices(probe)[get_shuffle_matrix_a_row_indices(probe, 128)]
    assert torch.equal(trtllm_gemm1(rows, gated=True), chained)


def test_p1_and_p3_by_formula():
    assert swap_halves(8).tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    n = 256
    expected = [(r // 64 % 2) * (n // 2) + 64 * (r // 128) + r % 64 for r in range(n)]
    assert interleave_64(n).tolist() == expected


def test_p4_offset_vector():
    off = tile_offsets(256, 32)
    points = {(0, 0): 0, (0, 3): 3, (0, 4): 512, (1, 0): 16, (31, 0): 496, (32, 0): 4, (96, 3): 15,
              (127, 31): 4095, (128, 0): 4096, (255, 31): 8191}
    for (m, k), value in points.items():
        assert int(off[m, k]) == value, (m, k)
    rows, cols = tiled_shape(100, 6)
    assert rows * cols == 1024 and rows * cols - 100 * 6 == 424


def elementwise_tiling(scale: torch.Tensor) -> torch.Tensor:
    """The 128x4 tiling, one element at a time from the SPEC P4 offset formula."""
    experts, rows, cols = scale.shape
    rows_p, cols_p = -(-rows // 128) * 128, -(-cols // 4) * 4
    out = torch.zeros(experts * rows_p * cols_p, dtype=torch.uint8)
    flat = scale.view(torch.uint8)
    for e, m, k in itertools.product(range(experts), range(rows), range(cols)):
        off = ((m // 128) * (cols_p // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
        out[e * rows_p * cols_p + off] = flat[e, m, k]
    return out.view(experts, rows_p, cols_p)


@pytest.mark.parametrize("hidden, inter", [(96, 48), (128, 80), (64, 16)])
def test_p4_tiling_against_elementwise_formula(hidden, inter):
    # relu2 on vllm_cutlass keeps row order, so the scales are tiled and padded only.
    layer = random_layer(2, hidden, inter, gated=False, seed=hidden)
    out = prepare(layer, "vllm_cutlass", "relu2").tensors
    inter_p = -(-inter // 128) * 128
    s2 = torch.nn.functional.pad(layer["w2_weight_scale"].view(torch.uint8), (0, (inter_p - inter) // 16))
    assert torch.equal(out["w2_weight_scale"].view(torch.uint8), elementwise_tiling(s2))
    s13 = torch.nn.functional.pad(layer["w13_weight_scale"].view(torch.uint8), (0, 0, 0, inter_p - inter))
    assert torch.equal(out["w13_weight_scale"].view(torch.uint8), elementwise_tiling(s13))


def test_p8_view_vector_and_flashinfer_helper():
    scale = torch.randint(0, 127, (2, 256, 32), dtype=torch.uint8)
    view = mma_view(scale)
    assert tuple(view.shape) == (32, 4, 2, 4, 8, 2)
    assert view.stride() == (16, 4, 4096, 1, 512, 8192)
    assert view.data_ptr() == scale.data_ptr()
    theirs = convert_sf_to_mma_layout(scale.view(512, 32), m=256, k=32 * 16, num_groups=2)
    assert theirs.shape == view.shape and theirs.stride() == view.stride() and torch.equal(theirs, view)


GEMM1_ROWS = {
    "flashinfer_cutlass": {0: "u0", 1: "u1", 2: "u2", 3: "u3", 128: "g0"},
    "vllm_cutlass": {0: "g0", 128: "u0"},
    "flashinfer_cutedsl": {0: "u0", 63: "u63", 64: "g0", 127: "g63", 128: "u64"},
}
TRTLLM_FIRST_20 = "u0 u2 u4 u6 u8 u10 u12 u14 g0 g2 g4 g6 g8 g10 g12 g14 u1 u3 u5 u7".split()


@pytest.mark.parametrize("backend", sorted(GEMM1_ROWS))
def test_gemm1_row_vectors(backend):
    tags = read_tags(prepare(tagged_layer(2, 256, 128), backend).tensors["w13_weight"][1])
    for row, tag in GEMM1_ROWS[backend].items():
        assert tags[row] == tag, (backend, row)


@pytest.mark.parametrize("activation", ["swiglu", "swigluoai"])
def test_trtllm_gemm1_row_vector(activation):
    tags = read_tags(prepare(tagged_layer(1, 256, 128, activation), "flashinfer_trtllm", activation)
                     .tensors["w13_weight"][0])
    assert tags[:20] == TRTLLM_FIRST_20


def test_trtllm_gated_padding_vector():
    out = prepare(tagged_layer(1, 256, 80), "flashinfer_trtllm").tensors["w13_weight"][0]
    assert out.shape[0] == 256  # 2 * Ip with Ip = 128
    # Undo P7 with the SPEC formula to see the padded rows "after P1".
    pi = trtllm_gemm1(256, gated=True)
    after_p1 = torch.empty_like(out)
    after_p1[pi] = out
    tags = read_tags(after_p1)
    assert [tags[r] for r in (78, 79, 80, 127, 128, 129)] == ["u78", "u79", "0", "0", "g0", "g1"]
    assert not bool(after_p1[80:128].any()) and not bool(after_p1[208:].any())


def e2m1_decode(data: bytes) -> list[float]:
    """SPEC section 1: two codes per byte, low nibble first."""
    magnitudes = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    values = []
    for byte in data:
        for code in (byte & 0xF, byte >> 4):
            values.append((-1 if code & 8 else 1) * magnitudes[code & 7])
    return values


def test_nibble_vector():
    assert e2m1_decode(bytes([0x2B, 0xF0, 0x71])) == [-1.5, 1.0, 0.0, -6.0, 0.5, 6.0]


def test_trtllm_hidden_padding_reported_and_zero():
    layer = random_layer(2, 400, 80, seed=3)
    prepared = prepare(layer, "flashinfer_trtllm")
    layout = prepared.layout
    assert (layout["hidden_dim_unpadded"], layout["hidden_dim"]) == (400, 512)
    assert (layout["intermediate_dim_unpadded"], layout["intermediate_dim"]) == (80, 128)
    assert tuple(prepared.tensors["w13_weight"].shape) == (2, 256, 256)
    assert tuple(prepared.tensors["w2_weight"].shape) == (2, 512, 64)
    assert tuple(prepared.tensors["w2_weight_scale"].shape) == (2, 512, 8)
    restored = unprepare(prepared.tensors, layout)
    assert torch.equal(restored["w2_weight"], layer["w2_weight"])
