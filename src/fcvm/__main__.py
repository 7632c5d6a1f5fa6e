from fcvm.cli.main import run

run()
