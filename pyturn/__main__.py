from pyturn.launch import main

main()
