"""`python -m llm2emb ...` = the `llm2emb` command, so launchers can start it as a module
(`accelerate launch -m llm2emb eval ...`)."""
import sys

from llm2emb.cli import main

if __name__ == "__main__":
    sys.exit(main())
