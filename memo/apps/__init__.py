"""The programs users run: the command line, the batch runner and the web app (thin layers over MemoGenerator)."""
