"""Data: tokenizers, chat templates, Nectar parsing/validation, the synthetic Nectar, grain pipelines."""

from starling_jax.data import synthetic
from starling_jax.data.nectar import DataReport, NectarError, parse_prompt, parse_rows, read_rows
from starling_jax.data.formats import preference_pairs
from starling_jax.data.pipelines import dataset_for, load_rows, make_dataset, split_heldout
from starling_jax.data.templates import TEMPLATES, ChatTemplate, get_template, render, render_text
from starling_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "synthetic", "DataReport", "NectarError", "parse_prompt", "parse_rows", "read_rows", "dataset_for", "load_rows",
    "make_dataset", "preference_pairs", "split_heldout", "TEMPLATES", "ChatTemplate", "get_template", "render",
    "render_text", "Tokenizer", "load_tokenizer",
]
