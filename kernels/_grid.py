"""Launch-grid helpers shared by the kernels that sweep (batch, channel) planes."""
import triton


def planes_per_program(hw_tiles: int, frames: int, n_planes: int, sm_count: int, programs_per_sm: int = 8) -> int:
    """How many (batch, channel) planes one program walks, reusing its per-pixel index work for each.

    Enough programs remain to fill the device `programs_per_sm` times over; the count is a power of
    two (at most 32) so that only a few variants of the kernel get compiled.
    """
    target_programs = max(programs_per_sm * sm_count, 1)
    planes = max(1, min(32, n_planes, (hw_tiles * frames * n_planes) // target_programs))
    return 1 << (planes.bit_length() - 1)


def pixel_block(hw: int, max_block: int = 1024) -> int:
    return min(max_block, triton.next_power_of_2(hw))


def plane_tiling(hw: int, frames: int, n_planes: int, sm_count: int, vec: int,
                 max_planes: int = 8) -> tuple[int, int, int]:
    """(BLOCK, PLANES, num_warps) for a gather that reuses per-pixel index work over planes.

    PLANES is as large as possible (≤ max_planes, a power of two, ≤ n_planes) while the grid still
    fills every SM once; BLOCK shrinks from `pixel_block(hw)` down to one warp of `vec`-wide rows
    (one 128-bit access per row) to make room for more planes at small latents. num_warps follows
    BLOCK (one `vec`-wide row per thread at the smallest BLOCK).
    """
    n_planes = max(n_planes, 1)
    cap = 1 << (min(max_planes, n_planes).bit_length() - 1)
    best = None
    block = max(pixel_block(hw), vec)
    smallest = min(block, 32 * vec)
    while block >= smallest:
        tiles = triton.cdiv(max(hw, 1), block) * max(frames, 1)
        planes = cap
        while planes > 1 and tiles * triton.cdiv(n_planes, planes) < sm_count:
            planes //= 2
        if best is None or planes > best[1]:
            best = (block, planes)
        block //= 2
    block, planes = best
    num_warps = max(1, min(4, block // (32 * vec)))
    return block, planes, num_warps
