from hmlm.cli import main

main()
