from dragonctl.cli import main

main()
