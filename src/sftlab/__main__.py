from sftlab.cli import main

main()
