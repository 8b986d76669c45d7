"""``python -m tinkex`` runs the ``tinkex`` command line."""

from tinkex._cli import main

if __name__ == "__main__":
    main()
