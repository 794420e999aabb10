module gotmpl

go 1.19
