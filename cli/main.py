"""The `gradstore` command line: thin click commands over the gradstore and qless libraries."""

import click

import gradstore


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(gradstore.__version__, prog_name="gradstore")
def cli() -> None:
    """gradstore: select training data by gradient similarity (LESS / QLESS).

    Example:

        gradstore query --task mmlu --k 5%
    """
