import pytest
import torch

from kvmesh.kernels.checksum import (
    BLOCK,
    PROGRAMS,
    checksum_partials,
    fold,
    layer_checksum,
    layer_checksum_ref,
)

MASK64 = (1 << 64) - 1
WORDS_PER_GRID = BLOCK * PROGRAMS  # past this, every program loops more than once


def definition(data: torch.Tensor) -> int:
    """The checksum in Python integers: little-endian 8-byte words, then the tail's single
    bytes, word i weighted by 2i + 1, mod 2^64."""
    raw = bytes(data.reshape(-1).view(torch.uint8).cpu().tolist())
    n8 = len(raw) // 8 * 8
    words = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, n8, 8)] + list(raw[n8:])
    return sum(w * (2 * i + 1) for i, w in enumerate(words)) & MASK64


def value(checksum: torch.Tensor) -> int:
    assert checksum.dtype == torch.int64 and checksum.numel() == 1
    return int(checksum.item()) & MASK64


def random_bytes(nbytes: int, offset: int, seed: int, device: str) -> torch.Tensor:
    """nbytes fresh random bytes as a view `offset` bytes into a larger buffer."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, 256, (offset + nbytes + 5,), dtype=torch.uint8, generator=gen)
    return buf.to(device)[offset : offset + nbytes]


def run_case(nbytes, offset, device="cpu", seed=0, kernel=layer_checksum, exact=True):  # fmt: skip
    data = random_bytes(nbytes, offset, seed, device)
    got = kernel(data)
    assert got.shape == () and got.device == data.device
    want = value(layer_checksum_ref(data))
    assert value(got) == want, f"{nbytes} bytes at offset {offset}"
    if exact:  # the reference itself against the definition
        assert want == definition(data)


SIZES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 100, 8 * BLOCK - 1, 8 * BLOCK, 8 * BLOCK + 3,
         8 * BLOCK * 5 + 13]  # fmt: skip


@pytest.mark.parametrize("offset", [0, 8, 3, 6])  # 3, 6: words not 8-aligned (the byte path)
@pytest.mark.parametrize("nbytes", SIZES)
def test_matches_the_definition(nbytes, offset):
    run_case(nbytes, offset, seed=nbytes + offset)


@pytest.mark.parametrize("offset", [0, 5])
def test_several_mib(offset):
    """More chunks than the grid has programs: each program strides over several."""
    nbytes = 5 * 8 * WORDS_PER_GRID + 7  # 5 MiB + 7: each program takes 5 or 6 chunks
    run_case(nbytes, offset, seed=1, exact=False)


def test_words_past_the_sign_bit_wrap_mod_2_64():
    """All-ones words are -1 as int64: every product and sum overflows, and must wrap."""
    data = torch.full((8 * WORDS_PER_GRID + 8 * 7 + 5,), 255, dtype=torch.uint8)
    assert value(layer_checksum(data)) == value(layer_checksum_ref(data)) == definition(data)
    assert value(layer_checksum(data[1:])) == definition(data[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_any_dtype_is_checksummed_as_its_bytes(dtype):
    gen = torch.Generator().manual_seed(3)
    layer = torch.randn((2, 3, 16, 2, 8), generator=gen).to(dtype)  # [2, n, page, Hk, D]
    want = definition(layer)
    assert value(layer_checksum(layer)) == value(layer_checksum_ref(layer)) == want
    assert value(layer_checksum(layer.view(torch.uint8))) == want


@pytest.mark.parametrize("kernel", [layer_checksum, layer_checksum_ref])
def test_writes_into_a_slot_of_out(kernel):
    data = random_bytes(1000, 0, 4, "cpu")
    out = torch.full((3,), 7, dtype=torch.int64)
    assert kernel(data, out[1]) is not None
    assert value(out[1]) == definition(data) and out[0] == 7 and out[2] == 7


def test_sees_a_flipped_bit_and_swapped_words():
    data = torch.randn((2, 3, 16, 2, 8), generator=torch.Generator().manual_seed(5)).bfloat16()
    base = value(layer_checksum(data))
    flipped = data.clone().view(torch.uint8).reshape(-1)
    flipped[777] ^= 0x80
    assert value(layer_checksum(flipped)) != base
    words = data.clone().reshape(-1).view(torch.int64)
    words[[3, 40]] = words[[40, 3]]
    assert value(layer_checksum(words)) != base


def test_needs_a_contiguous_tensor():
    with pytest.raises(AssertionError, match="memory order"):
        layer_checksum(torch.zeros(4, 4)[:, 0])


# one launch for a list of layers: sizes, alignments (16, 8, 1) and an empty one, in one table
BATCH = [(8 * BLOCK * 3 + 21, 0), (100, 8), (8 * BLOCK + 5, 3), (0, 0), (7, 6), (4096, 0),
         (8 * BLOCK * 2, 8)]  # fmt: skip


def run_batch_case(device: str = "cpu", programs: int = PROGRAMS, exact: bool = True) -> None:
    """Every layer of BATCH in one launch: each row of partials folds to its checksum."""
    layers = [random_bytes(n, off, seed=i, device=device) for i, (n, off) in enumerate(BATCH)]
    partials = checksum_partials(layers, programs)
    assert partials.shape == (len(layers), programs) and partials.device == layers[0].device
    got = fold(partials.cpu())
    assert got == [value(layer_checksum_ref(x)) for x in layers]
    if exact:
        assert got == [definition(x) for x in layers]


@pytest.mark.parametrize("programs", [PROGRAMS, 1, 5])
def test_one_launch_checksums_a_list_of_layers(programs):
    run_batch_case(programs=programs)


def test_layers_of_any_dtype_share_a_launch():
    gen = torch.Generator().manual_seed(7)
    layers = [torch.randn((2, 3, 16, 2, 8), generator=gen).to(dtype)
              for dtype in (torch.bfloat16, torch.float32, torch.float16)]  # fmt: skip
    assert fold(checksum_partials(layers)) == [definition(x) for x in layers]


@pytest.mark.parametrize("layer_bytes", [8 * BLOCK + 8, 8 * BLOCK + 5, 24])
def test_a_run_of_layers_back_to_back_is_checksummed_layer_by_layer(layer_bytes):
    """A tensor holding several equal layers back to back (counts) gives each layer its own row,
    as if each were its own tensor; alignments differ from layer to layer when the size is odd."""
    runs = [random_bytes(3 * layer_bytes, 0, 1, "cpu"), random_bytes(layer_bytes, 8, 2, "cpu"),
            random_bytes(2 * layer_bytes, 3, 3, "cpu")]  # fmt: skip
    counts = [3, 1, 2]
    layers = [run[i * layer_bytes : (i + 1) * layer_bytes]
              for run, n in zip(runs, counts, strict=True) for i in range(n)]  # fmt: skip
    got = fold(checksum_partials(runs, 5, counts=counts))
    assert got == [definition(x) for x in layers]
    assert got == fold(checksum_partials(layers, 5))


def run_out_case(device: str = "cpu") -> None:
    """The partial sums go into `out` (on a GPU: pinned host memory, which the launch writes
    directly), the rows around it untouched."""
    layers = [random_bytes(n, off, seed=i, device=device) for i, (n, off) in enumerate(BATCH)]
    out = torch.full((len(layers) + 2, 5), -1, dtype=torch.int64, pin_memory=device != "cpu")
    partials = checksum_partials(layers, 5, out=out[1:-1])
    if device != "cpu":
        torch.cuda.synchronize()
    assert partials.data_ptr() == out[1].data_ptr()
    assert fold(out[1:-1]) == [definition(x) for x in layers]
    assert out[0].tolist() == [-1] * 5 and out[-1].tolist() == [-1] * 5


def test_partials_go_into_out_when_given():
    run_out_case()


def test_fold_wraps_mod_2_64():
    partials = torch.tensor([[-1, 2], [2**62, 2**62 + 2**62 - 1]], dtype=torch.int64)
    assert fold(partials) == [1, (2**63 - 1 + 2**62) & MASK64]
