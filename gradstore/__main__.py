"""`python -m gradstore` runs the CLI."""

from gradstore_cli.main import cli

if __name__ == "__main__":
    cli(prog_name="gradstore")
