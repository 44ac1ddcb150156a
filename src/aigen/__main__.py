from aigen.cli.main import app

app(prog_name="aigen")
