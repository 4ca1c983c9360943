"""What the trainer reads: Megatron-compatible shards, packed samples, blends and the batch iterator."""

from megaqwen.data.blend import BlendedDataset, BlendRecipe, build_dataset, load_blend_recipe, make_recipe
from megaqwen.data.dataset import GPTDataset, packing_features
from megaqwen.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megaqwen.data.sampler import BatchIterator

__all__ = [
    "BatchIterator",
    "BlendRecipe",
    "BlendedDataset",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "build_dataset",
    "load_blend_recipe",
    "make_recipe",
    "packing_features",
]
