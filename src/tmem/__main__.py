"""``python -m tmem`` is the ``tmem`` command."""

from tmem.cli import main

if __name__ == "__main__":
    main()
