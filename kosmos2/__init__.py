"""kosmos2: Kosmos-2, the multimodal language model that can point (Peng et al. 2023, arXiv:2306.14824).

`import kosmos2` stays light: torch-heavy parts are imported when first used.
"""

__version__ = "0.1.0"
