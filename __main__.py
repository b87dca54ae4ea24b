"""`python -m ddaug ...` runs the `ddaug` command."""

from ddaug.cli import main

if __name__ == "__main__":
    main()
