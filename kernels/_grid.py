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
