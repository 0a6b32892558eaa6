from pyturn.cli import main

main()
