from archivecolor.cli import app

app(prog_name="archivecolor")
