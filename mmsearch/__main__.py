from mmsearch.cli import run

run()
