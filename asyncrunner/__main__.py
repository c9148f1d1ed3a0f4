from asyncrunner.cli import entry

entry()
