from featx.cli import app

app()
