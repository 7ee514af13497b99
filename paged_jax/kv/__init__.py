"""KV cache memory management: the block allocator, the paged block manager with prefix
caching and swap space, and the paper's Orca baseline, behind one interface (interface.py)."""

from paged_jax.kv.block_manager import BlockManager
from paged_jax.kv.interface import KVCacheManager
from paged_jax.kv.reservation import ReservingBlockManager


def make_block_manager(memory_manager: str, num_blocks: int, block_size: int, max_model_len: int,
                       **paged_options) -> KVCacheManager:
    """The memory manager by name: "paged" (ours; paged_options are BlockManager's) or one of
    the paper's Orca baselines, "orca-max" / "orca-pow2" / "orca-oracle"."""
    if memory_manager == "paged":
        return BlockManager(num_blocks, block_size, **paged_options)
    return ReservingBlockManager(num_blocks, block_size, memory_manager.removeprefix("orca-"), max_model_len)
