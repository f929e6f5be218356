"""Byte views of tensors whose size-1 dimensions carry strides other than the row-major ones."""

from __future__ import annotations

import pytest
import torch

from nvfp4_prep.contract.tensor_bytes import byte_view, dense
from nvfp4_prep.wire.framing import tensor_bytes


def cases() -> dict[str, torch.Tensor]:
    pair = torch.tensor([[1.5, 2.5]])
    return {
        "expanded scalar": torch.tensor(3.0).expand(1).contiguous(),
        "column of one row": pair[:, 0].contiguous(),
        "second column": pair[:, 1],
        "stride 0 in the middle": torch.arange(8, dtype=torch.float32).view(2, 1, 4).as_strided((2, 1, 4), (4, 0, 1)),
        "last dim of one": torch.arange(6, dtype=torch.float32).view(1, 6, 1).as_strided((1, 6, 1), (7, 1, 5)),
        "one element of float8": torch.zeros(4, dtype=torch.uint8).view(torch.float8_e4m3fn)[:1].as_strided((1, 1),
                                                                                                            (3, 3)),
        "empty": torch.zeros(0, 3, dtype=torch.float32).as_strided((0, 3), (0, 0)),
    }


@pytest.mark.parametrize("case", list(cases()))
def test_byte_view_and_tensor_bytes_of_odd_strides(case):
    tensor = cases()[case]
    want = tensor.clone(memory_format=torch.contiguous_format).numpy().tobytes() \
        if tensor.dtype != torch.float8_e4m3fn else bytes(tensor.reshape(-1).view(torch.uint8).tolist())
    data = byte_view(tensor)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert bytes(data.tolist()) == want
    assert bytes(tensor_bytes(tensor)) == want


@pytest.mark.parametrize("case", list(cases()))
def test_dense_gives_row_major_strides(case):
    tensor = cases()[case]
    out = dense(tensor)
    assert out.shape == tensor.shape and torch.equal(out.view(torch.uint8) if out.element_size() == 1 else out,
                                                     tensor.view(torch.uint8) if out.element_size() == 1 else tensor)
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= size
    assert out.stride() == tuple(reversed(expected))


def test_dense_keeps_a_row_major_tensor_as_it_is():
    tensor = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert dense(tensor) is tensor
