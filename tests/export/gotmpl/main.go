// Command gotmpl renders an Ollama TEMPLATE the way Ollama's chat endpoint does, for the tests.
//
// Input (stdin, JSON): {"template": "...", "system": "...", "messages": [{"role": "...", "content": "..."}],
// "think": true|false|null}. "system" is the Modelfile's SYSTEM: it is put in front of the messages when
// the first one is not a system message. Messages of the same role in a row are merged with a blank
// line, and .System is every system message joined the same way, as Ollama does before it executes
// the template with Go's text/template (missingkey=zero). The rendering goes to stdout.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
	Think    *bool     `json:"think"`
}

// Data has the fields Ollama's templates see; Prompt and Response are the old single-turn form.
type Data struct {
	System     string
	Prompt     string
	Response   string
	Messages   []*Message
	Think      bool
	IsThinkSet bool
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func run() error {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	var in Input
	if err := json.Unmarshal(raw, &in); err != nil {
		return fmt.Errorf("bad input JSON: %w", err)
	}
	msgs := in.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && in.System != "" {
		msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		return err
	}
	system, collated := collate(msgs)
	data := Data{System: system, Messages: collated, IsThinkSet: in.Think != nil}
	if in.Think != nil {
		data.Think = *in.Think
	}
	return tmpl.Execute(os.Stdout, data)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
