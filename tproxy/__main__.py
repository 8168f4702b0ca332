from tproxy.cli import main

main()
