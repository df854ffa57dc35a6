"""Compile variants of fastadapt/triton_kernels/dropout.py (Philox masks regenerated from a seed).

Elementwise kernels (no tl.dot): the grid and tiles come from the launchers' ``_elementwise_grid``;
d = 4096 is the standard shape, d = 100 an odd width (partial Philox groups, a (BLOCK_M, 128) tile).
"""
from __future__ import annotations

from benchmarks.compile_report import FEATURES, ROWS, Variant, mock_tensor

SEED = 0x5DEECE66D * 4099          # an int64 seed, as draw_dropout_seed gives


def variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import dropout as P
    out = {"_seeded_dropout_kernel": [], "_dropout_mask_add_kernel": []}

    def dropout(d, with_rest):
        grid, block_m, block_d = P._elementwise_grid(ROWS, d)

        def build(dtype):
            args = (mock_tensor(dtype), mock_tensor(dtype), mock_tensor(dtype), ROWS, d, d, 1, SEED, 0.1, 1 / 0.9)
            return args, dict(HAS_REST=with_rest, BLOCK_M=block_m, BLOCK_D=block_d)
        return build, grid

    def mask_add(d):
        grid, block_m, block_d = P._elementwise_grid(ROWS, d)

        def build(dtype):
            args = (mock_tensor(dtype), mock_tensor(dtype), ROWS, d, d, 1, d, 1, SEED, 0.1, 1 / 0.9)
            return args, dict(BLOCK_M=block_m, BLOCK_D=block_d)
        return build, grid

    for d in (FEATURES, 100):
        for with_rest in (True, False):
            build, grid = dropout(d, with_rest)
            out["_seeded_dropout_kernel"].append(Variant(f"d={d}{' with rest' if with_rest else ''}", build,
                                                         grid=grid, standard=d == FEATURES))
        build, grid = mask_add(d)
        out["_dropout_mask_add_kernel"].append(Variant(f"d={d}", build, grid=grid, standard=d == FEATURES))
    return out
