"""Command-line interface ``gradcoh`` (typer); commands import the libraries lazily."""
