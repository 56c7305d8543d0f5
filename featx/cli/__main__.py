from featx.cli.main import app

app()
