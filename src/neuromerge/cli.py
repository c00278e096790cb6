"""Command-line interface (placeholder, filled by the engine work)."""


def main() -> None:
    print("neuromerge")
