from mmtune.cli import main

main()
