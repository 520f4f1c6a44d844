"""torchfg.datasets."""

from torchfg.datasets.synthetic_products import (
    ATTRIBUTE_GROUPS,
    ATTRIBUTE_NAMES,
    DOMAIN_NAMES,
    MAP_QUALITIES,
    SEMANTIC_NAMES,
    ProductCatalogue,
    ProductSample,
    SyntheticProducts,
    split_product_ids,
)
from torchfg.datasets.text import HashedBagOfWordsEncoder

__all__: list[str] = [
    "ATTRIBUTE_GROUPS",
    "ATTRIBUTE_NAMES",
    "DOMAIN_NAMES",
    "MAP_QUALITIES",
    "SEMANTIC_NAMES",
    "HashedBagOfWordsEncoder",
    "ProductCatalogue",
    "ProductSample",
    "SyntheticProducts",
    "split_product_ids",
]
