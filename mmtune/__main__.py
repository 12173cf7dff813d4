from mmtune.entry import main

main()
